"""The λ file: a safetensors file (tensors + JSON metadata) that loads without executing anything.

It records what the λ were fitted for; loading it for another solver, NFE, grid, schedule, denoiser or guidance scale
is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from .atomic import atomic_path
from .schedules import Schedule
from .solvers import LambdaLayout

__all__ = ["save_lambdas", "load_lambdas", "lambdas_to_apply", "schedule_id", "LambdaFileError", "MATCH_KEYS"]

FORMAT = "dode-lightning/lambdas/1"
# Fields that must agree between a λ file and the run that uses it.
# `guidance_scale` (float) is recorded for text-conditional pipelines: λ fitted for one guided denoiser.
MATCH_KEYS = ("solver", "nfe", "grid", "grid_kwargs", "schedule", "denoiser", "guidance_scale")


class LambdaFileError(ValueError):
    """A λ file that is unreadable or was fitted for another configuration."""


def schedule_id(schedule: Schedule) -> str:
    """A short, stable description of a schedule (class and parameters; discrete β tables by hash)."""
    fields = {k: v for k, v in sorted(vars(schedule).items()) if isinstance(v, (int, float, str))}
    betas = getattr(schedule, "betas", None)
    if betas is not None:
        fields["betas_sha256"] = hashlib.sha256(betas.numpy().tobytes()).hexdigest()[:16]
    return f"{type(schedule).__name__}{json.dumps(fields, sort_keys=True)}"


def save_lambdas(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write `tensors` (must include `lambdas`) and metadata atomically (temporary file, then rename)."""
    path = Path(path)
    meta = {"format": FORMAT, "metadata": json.dumps(metadata, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_lambdas(path: str | Path, expect: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a λ file; with `expect`, refuse it unless every MATCH_KEYS field present in `expect` agrees."""
    path = Path(path)
    if not path.is_file():
        raise LambdaFileError(f"λ file {path} does not exist: run train.py first or pass the path it printed")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LambdaFileError(f"{path} is not a readable λ file ({err}); refit with train.py") from None
    if header.get("format") != FORMAT or "lambdas" not in tensors:
        raise LambdaFileError(f"{path} is not a dode-lightning λ file (format {header.get('format')!r})")
    metadata = json.loads(header["metadata"])
    if expect:
        wrong = [
            f"{key}={metadata.get(key)!r} (this run: {expect[key]!r})"
            for key in MATCH_KEYS
            if key in expect and _normalise(metadata.get(key)) != _normalise(expect[key])
        ]
        if wrong:
            raise LambdaFileError(f"{path} was fitted for another configuration: {'; '.join(wrong)}; refit with train.py")
    return tensors, metadata


def lambdas_to_apply(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any], num_stages: int, image_shape: Sequence[int]
) -> Tensor:
    """The file's λ as `Solver.sample` applies them, expanded by the layout the file records (history, groups).

    A file whose λ do not have the shape its layout gives for this solver and image is refused in one line.
    """
    lambdas = tensors["lambdas"].to(torch.float64)
    try:
        layout = LambdaLayout(int(metadata.get("history", 1)), str(metadata.get("lambda_groups", "none")))
        if len(lambdas) != num_stages:
            raise ValueError(f"it holds λ for {len(lambdas)} stages, this solver has {num_stages}")
        return layout.expand(lambdas, image_shape)
    except ValueError as err:
        raise LambdaFileError(f"{path}: {err}; refit with train.py") from None


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))

