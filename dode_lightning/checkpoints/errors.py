"""Errors raised by the checkpoint loaders, and the safe way to put text taken from a checkpoint into them."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

__all__ = ["CheckpointError", "RefusedGlobalError", "one_line", "quoted", "state_dict_mismatch"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, of the wrong format, or inconsistent."""


class RefusedGlobalError(CheckpointError):
    """A pickle asked for a global that is not on the allow-list; nothing from it was imported or called."""


def _escape_unprintable(text: str) -> str:
    # Control characters (ANSI escapes, carriage returns, bidi overrides) written raw could repaint the terminal
    # around the message; repr() spells each of them as a visible escape.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(text: object, limit: int = 240) -> str:
    """Collapse whitespace, spell out control characters and cap the length, so a message stays one visible line."""
    try:
        text = str(text)
    except Exception:  # e.g. an exception carrying an integer too long to format
        text = f"<{type(text).__name__} that cannot be printed>"
    flat = _escape_unprintable(" ".join(text[: 4 * limit].split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def quoted(value: object, limit: int = 60) -> str:
    """A short, printable rendering of a value read from an untrusted file, for error messages.

    Strings are quoted with control characters escaped and cut to `limit` characters; integers too long to print
    usefully (or at all: Python refuses to format more than 4300 digits) are given by their size; containers and
    other objects by their type, since printing them could recurse or allocate without bound.
    """
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else text + "…"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    return f"a {type(value).__name__}"


def state_dict_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """Short description of how two state dicts differ (names, shapes); empty when they agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {quoted(missing[0])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {quoted(unexpected[0])})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shape (first {quoted(k)}: file {tuple(found[k].shape)}, net {tuple(expected[k].shape)})")
    return "; ".join(parts)
