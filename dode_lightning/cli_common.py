"""Small pieces both command lines share: one-line messages, run folders that DDP processes agree on and that an
unfinished run takes away again, SIGINT/SIGTERM as one exception, the TensorBoard command. No Lightning import:
sample.py's light commands (--help, fid, export-scheduler, …) use it."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

from tqdm import tqdm

__all__ = [
    "one_line",
    "unique_version",
    "forget_run_version",
    "release_run_folders",
    "is_launched_rank",
    "tensorboard_command",
    "RUN_VERSION_ENV",
    "Interrupted",
    "stop_on_interrupt",
    "run_until_stopped",
    "signals_deferred",
    "release_process_group",
]

# Set by the launching process once it has named the run, so the DDP processes it starts log under the same name.
RUN_VERSION_ENV = "DODE_RUN_VERSION"


def one_line(message: str, limit: int = 400) -> str:
    """A multi-line message as one line (indentation dropped), shortened to `limit` characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tensorboard_command(logdir: str | Path) -> str:
    """A TensorBoard command that works without an activated venv: this interpreter runs tensorboard's module."""
    return f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir {shlex.quote(str(logdir))}"


def is_launched_rank() -> bool:
    """Whether this process is a DDP process Lightning launched (not the one the user started)."""
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("LOCAL_RANK", "NODE_RANK", "RANK"))


# Run folders this process created (`unique_version`) and has not kept yet: an unfinished run removes them, and the
# parents it had to create for them (`runs/`, `runs/<config>/`) where nothing else is in them.
_CLAIMED: list[Path] = []
_CREATED_PARENTS: list[Path] = []


def forget_run_version() -> None:
    """Drop a name an earlier run in this process chose (a launched DDP process keeps its launcher's)."""
    _CLAIMED.clear()
    _CREATED_PARENTS.clear()
    if not is_launched_rank():
        os.environ.pop(RUN_VERSION_ENV, None)


def unique_version(root: Path, base: str) -> str:
    """`base`, or `base_2`, `base_3`, … if `root` already holds it; a launched DDP process takes its launcher's.

    The folder `root/<version>` is created here, atomically (mkdir fails if it exists), so two runs started
    together never share one; `release_run_folders` removes it again if the run does not finish.
    """
    if is_launched_rank() and os.environ.get(RUN_VERSION_ENV):
        return os.environ[RUN_VERSION_ENV]
    _CREATED_PARENTS.extend(folder for folder in (root, *root.parents) if not folder.exists())
    root.mkdir(parents=True, exist_ok=True)
    version, count = base, 1
    while True:
        try:
            (root / version).mkdir()
            break
        except FileExistsError:
            count += 1
            version = f"{base}_{count}"
    _CLAIMED.append(root / version)
    os.environ[RUN_VERSION_ENV] = version
    return version


def release_run_folders() -> None:
    """Remove the run folders this process created for a run that did not finish (a failed, refused or interrupted
    run leaves no TensorBoard run behind, and the next run takes its name)."""
    while _CLAIMED:
        shutil.rmtree(_CLAIMED.pop(), ignore_errors=True)
    for parent in _CREATED_PARENTS:  # innermost first: rmdir removes only empty folders
        try:
            parent.rmdir()
        except OSError:
            break
    _CREATED_PARENTS.clear()


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException like KeyboardInterrupt, so no `except Exception` swallows it; raised
    wherever the main thread is, which is safe because every file is written atomically (whole or not at all)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: the shell's code of a process the signal ended."""
        return 128 + self.signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# `signals_deferred`'s state: whether a block is running, and the signal that arrived in it.
_deferral: dict[str, Any] = {"active": False}


@contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM alike raise `Interrupted` in the main thread; further ones are ignored while the run cleans
    up. Lightning adds its SIGTERM notifier in front of this handler during fit/predict (it forwards the signal to the
    DDP processes it launched) and restores it afterwards."""

    def stop(signum: int, frame: FrameType | None) -> None:
        for number in _STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        if _deferral["active"]:
            _deferral["pending"] = signum
            return
        raise Interrupted(signum)

    previous = {number: signal.signal(number, stop) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside `stop_on_interrupt`: a SIGINT/SIGTERM arriving in the block stops the run only after it (a write and the
    note that it happened stay together)."""
    _deferral["active"] = True
    try:
        yield
    finally:
        _deferral["active"] = False
    pending = _deferral.pop("pending", None)
    if pending is not None:
        raise Interrupted(pending)


def run_until_stopped(run: Callable[[], int], stopped: Callable[[Interrupted], str], finished: Callable[[int], bool]) -> int:
    """`run()`'s exit code; on SIGINT/SIGTERM the line `error: <stopped(signal)>` (from the launching process only)
    and 130 / 143. Run folders this process created are removed unless `finished(exit code)`."""
    code = 1
    with stop_on_interrupt():
        try:
            code = run()
        except Interrupted as stop:
            code = stop.exit_code
            for bar in list(getattr(tqdm, "_instances", ())):  # an open progress bar would end mid-line
                bar.close()
            if not is_launched_rank():
                print(f"error: {stopped(stop)}", file=sys.stderr)
        finally:
            if not finished(code):
                release_run_folders()
            if code == 0:  # a failing rank leaves its group to the exit, so the others' watchdog names it
                release_process_group()
    return code


def release_process_group() -> None:
    """Tear down this process's torch.distributed group (a DDP rank that finished) before the interpreter exits: left to
    exit-time destruction, gloo's threads can abort it ("terminate called without an active exception", seen on
    train.py's rank 1 while rank 0 wrote its report)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
