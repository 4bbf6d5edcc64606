"""Atomic file writes: readers see the old file or the whole new one, and a killed process leaves no partial file."""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "is_temporary_of", "writable_folder_error", "TEMPORARY_SUFFIX"]

# Temporaries are hidden files `.<target name>.<mkstemp's random part>.tmp` beside their target, so a rerun can
# recognise (by the target's name) exactly those a killed run of this package left behind.
TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]+" + re.escape(TEMPORARY_SUFFIX))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_temporary_of(name: str, target: re.Pattern[str]) -> bool:
    """Whether file name `name` is an `atomic_path` temporary of a file whose name fully matches `target`."""
    match = _TEMPORARY.fullmatch(name)
    return match is not None and target.fullmatch(match["target"]) is not None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed otherwise.

    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask), not mkstemp's 0600; the mode
    is set after the block, since a writer may replace the temporary (safetensors recreates it with 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def writable_folder_error(folder: str | Path) -> str | None:
    """Why no file can be created in `folder` (made with its parents if missing), or None when one can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None
