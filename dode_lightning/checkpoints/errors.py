"""Errors raised by the checkpoint loaders."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

__all__ = ["CheckpointError", "RefusedGlobalError", "one_line", "state_dict_mismatch"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, of the wrong format, or inconsistent."""


class RefusedGlobalError(CheckpointError):
    """A pickle asked for a global that is not on the allow-list; nothing from it was imported or called."""


def one_line(text: object, limit: int = 240) -> str:
    """Collapse whitespace so an error message stays on one line, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def state_dict_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """Short description of how two state dicts differ (names, shapes); empty when they agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shape (first {k}: file {tuple(found[k].shape)}, net {tuple(expected[k].shape)})")
    return "; ".join(parts)
