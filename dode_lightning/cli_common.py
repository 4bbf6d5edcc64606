"""Small pieces both command lines share: one-line messages, run names that DDP processes agree on, the TensorBoard
command. No Lightning import: sample.py's light commands (--help, fid, export-scheduler, …) use it."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

__all__ = ["one_line", "unique_version", "forget_run_version", "tensorboard_command", "RUN_VERSION_ENV"]

# Set by the launching process once it has named the run, so the DDP processes it starts log under the same name.
RUN_VERSION_ENV = "DODE_RUN_VERSION"


def one_line(message: str, limit: int = 400) -> str:
    """A multi-line message as one line (indentation dropped), shortened to `limit` characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tensorboard_command(logdir: str | Path) -> str:
    """A TensorBoard command that works without an activated venv: this interpreter runs tensorboard's module."""
    return f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir {shlex.quote(str(logdir))}"


def _is_launched_rank() -> bool:
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def forget_run_version() -> None:
    """Drop a name an earlier run in this process chose (a launched DDP process keeps its launcher's)."""
    if not _is_launched_rank():
        os.environ.pop(RUN_VERSION_ENV, None)


def unique_version(root: Path, base: str) -> str:
    """`base`, or `base_2`, `base_3`, … if `root` already holds it; a launched DDP process takes its launcher's."""
    if _is_launched_rank() and os.environ.get(RUN_VERSION_ENV):
        return os.environ[RUN_VERSION_ENV]
    version, count = base, 1
    while (root / version).exists():
        count += 1
        version = f"{base}_{count}"
    os.environ[RUN_VERSION_ENV] = version
    return version
