"""Quiet command lines: silence Lightning output that carries no information for these CLIs, and nothing else.

Silenced: the litlogger advertisement, the GPU/TPU availability lines, "Seed set to N" (the seeds are in the config and
the λ file), the `LeafSpec` deprecation Lightning itself triggers, and "Found N module(s) in eval mode" (the frozen
denoiser is in eval mode on purpose). Every other
warning and log line still reaches the terminal.
"""
from __future__ import annotations

import logging
import re
import warnings

__all__ = ["silence_lightning_noise", "NOISE_LINES"]

# Prefixes of Lightning's info lines that are dropped (after a DDP process's "[rank: N] " prefix).
NOISE_LINES = ("GPU available:", "TPU available:", "💡 Tip: For seamless cloud logging", "Seed set to ")
_RANK_PREFIX = re.compile(r"\[rank: \d+\] ")
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero", "lightning_fabric.utilities.seed")


class _DropNoiseLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _RANK_PREFIX.sub("", record.getMessage(), count=1).startswith(NOISE_LINES)


def silence_lightning_noise() -> None:
    """Install the filters (idempotent; DDP child processes call it again when they re-run the CLI)."""
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoiseLines) for f in logger.filters):
            logger.addFilter(_DropNoiseLines())
