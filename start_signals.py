"""Ctrl-C or SIGTERM while train.py / sample.py import the package (seconds on a busy machine) ends in one line too.

Standard library only: the scripts import this before `dode_lightning`, whose import brings in torch and Lightning.
The commands then install their own handling (`dode_lightning.cli_common.stop_on_interrupt`).
"""
import signal
import sys


def _stopped_while_starting(number: int, frame: object) -> None:
    print(f"error: stopped by {signal.Signals(number).name} while starting; nothing was written", file=sys.stderr)
    sys.exit(128 + number)


def stop_cleanly_while_starting() -> None:
    """SIGINT and SIGTERM: the one line and exit code 130 / 143 instead of a traceback or a silent end."""
    signal.signal(signal.SIGINT, _stopped_while_starting)
    signal.signal(signal.SIGTERM, _stopped_while_starting)
