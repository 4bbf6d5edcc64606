"""The two calls a researcher's script needs: `calibrate` a student for a denoiser, `load_student` from a λ file.

Thin on purpose: `calibrate` runs the same `DODECalibration` / `TeacherTargets` fit as train.py (one process, no
logger), `load_student` reads a λ file as sample.py does; a `Student` samples with the solver's own `sample`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .denoisers import FirstStepMean
from .checkpoints import LoadedDenoiser
from .distill import SolverSetup
from .lambda_file import LambdaFileError, load_lambdas, save_lambdas, schedule_from_id
from .schedules import EDM, Schedule
from .solvers import LambdaLayout, NFEError, Solver, Stage

__all__ = ["Student", "calibrate", "load_student"]


@dataclass
class Student:
    """A calibrated D-ODE student: the solver on its step positions, its λ and their layout."""

    solver: Solver
    lambdas: Tensor
    """λ as the λ file stores them: (K,), or (K, m, groups) for `history`/`lambda_groups` layouts."""
    layout: LambdaLayout
    metadata: dict[str, Any]
    """What the λ were fitted for (the λ file's metadata)."""
    first_denoised: Tensor | None = None
    """`first_step: mean`: the stored x̂₀ that answers the first evaluation (the network is then called nfe − 1 times)."""

    @property
    def sigmas(self) -> Tensor:
        """The step positions σ_0 > … > σ_N the student samples on."""
        return self.solver.sigmas

    @property
    def nfe(self) -> int:
        """The solver's evaluations per sample, the first (at σ_0) included."""
        return self.solver.nfe

    @property
    def network_nfe(self) -> int:
        """The network calls per sample: `nfe`, less the first evaluation where `first_denoised` answers it (the NFE
        train.py was given)."""
        return self.solver.nfe - (0 if self.first_denoised is None else 1)

    def sample(
        self, denoiser: Callable[..., Tensor], noise: Tensor, class_labels: Tensor | None = None, observe: Callable[[int, Stage, Tensor], None] | None = None
    ) -> Tensor:
        """The final state from unit-variance latents `noise` (B, C, H, W): `denoiser(x, σ, class_labels) -> x̂₀`.
        `observe(k, stage, state)` sees each stage's state (at `solver.target_sigmas[k]`)."""
        if self.first_denoised is not None:
            if tuple(noise.shape[1:]) != tuple(self.first_denoised.shape):
                raise ValueError(f"noise of shape {tuple(noise.shape)}: this student was calibrated on images of shape {tuple(self.first_denoised.shape)}; pass (B, {', '.join(map(str, self.first_denoised.shape))})")
            denoiser = FirstStepMean(denoiser, float(self.solver.sigmas[0]), self.first_denoised)
        lambdas = self.layout.expand(self.lambdas, noise.shape[1:]).to(noise.device)
        with torch.no_grad():
            return self.solver.sample(denoiser, noise, lambdas, class_labels, observe=observe)



def _loaded(denoiser: dict[str, Any] | LoadedDenoiser | nn.Module, image_shape: tuple[int, int, int] | None, schedule: Schedule | None, label_dim: int) -> dict[str, Any] | LoadedDenoiser:
    """A config section or a `LoadedDenoiser` as given; a bare network `denoiser(x, σ, labels) -> x̂₀` wrapped as one."""
    if isinstance(denoiser, (dict, LoadedDenoiser)):
        return denoiser
    if image_shape is None:
        raise ValueError("a bare denoiser needs image_shape=(C, H, W) (and schedule= if it is not EDM's σ 0.002 … 80)")
    return LoadedDenoiser(denoiser, tuple(image_shape), label_dim, schedule or EDM(), f"python:{type(denoiser).__qualname__}", "python")


def calibrate(
    denoiser: dict[str, Any] | LoadedDenoiser | nn.Module,
    solver: str = "ipndm",
    nfe: int = 5,
    *,
    image_shape: tuple[int, int, int] | None = None,
    schedule: Schedule | None = None,
    label_dim: int = 0,
    output: str | Path | None = None,
    data: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    **model: Any,
) -> Student:
    """Fit a D-ODE student for `denoiser` exactly as train.py does, and return it.

    `denoiser`: a config `denoiser:` section (`{"source": "edm_pickle", "path": ...}`), a `LoadedDenoiser`, or a
    network `denoiser(x, σ, class_labels=None) -> x̂₀` on VE-form states (then `image_shape`, and `schedule` /
    `label_dim` where they differ from EDM / unconditional). `model`: the other keys of the config's `model` section
    (e.g. `grid="teacher_dp"`, `terminal_zero=False`, `history=10`, `fit="joint"`); `data`: the `data` section
    (e.g. `{"batch_size": 100, "seed": 0}`; no cache unless `cache_dir` is given); `trainer`: Trainer arguments
    (default: one CPU or GPU process, no logger). `output`: also write the λ file there.
    """
    import pytorch_lightning as pl

    from .lightning import DODECalibration, TeacherTargets, lambda_file_contents, limit_threads_for_builtin

    module = DODECalibration(_loaded(denoiser, image_shape, schedule, label_dim), solver, nfe, **model)
    datamodule = TeacherTargets(**{"cache_dir": None, **(data or {})})
    options = {"devices": 1, "logger": False, "enable_checkpointing": False, "enable_model_summary": False, "enable_progress_bar": False}
    fitter = pl.Trainer(**{**options, **(trainer or {}), "max_epochs": -1, "num_sanity_val_steps": 0, "use_distributed_sampler": False})
    limit_threads_for_builtin(module.loaded, fitter.strategy.root_device)
    fitter.fit(module, datamodule=datamodule)
    tensors, metadata = lambda_file_contents(module, datamodule, module.evaluate())
    if output is not None:
        save_lambdas(output, tensors, metadata)
    return Student(module.student, tensors["lambdas"], module.layout, metadata, tensors.get("first_denoised"))


def load_student(lambda_file: str | Path, schedule: Schedule | None = None) -> Student:
    """The student a λ file holds (its σ, λ and layout), ready to `sample`.

    `schedule`: the denoiser's schedule, needed where the file's metadata cannot rebuild it (a diffusers pipeline's
    own β table); by default the schedule the file names.
    """
    tensors, metadata = load_lambdas(lambda_file, schedule=schedule)
    schedule = schedule or schedule_from_id(metadata.get("schedule", ""))
    if schedule is None:
        raise LambdaFileError(f"{lambda_file} was fitted on the schedule {metadata.get('schedule')!r}, which it cannot rebuild; pass schedule= (the denoiser's)")
    return student_of(tensors, metadata, schedule, lambda_file)


def student_of(tensors: dict[str, Tensor], metadata: dict[str, Any], schedule: Schedule, lambda_file: str | Path) -> Student:
    """The student of a λ file already read with `load_lambdas` (`lambda_file` names it in errors), on `schedule`."""
    try:
        setup = SolverSetup.resolve(metadata["solver"], metadata["nfe"], schedule, metadata.get("grid"), tensors["sigmas"], **metadata.get("grid_kwargs", {}))
        layout = LambdaLayout(int(metadata.get("history", 1)), str(metadata.get("lambda_groups", "none")))
        return Student(setup.build(), tensors["lambdas"].to(torch.float64), layout, metadata, tensors.get("first_denoised"))
    except (KeyError, NFEError, ValueError, TypeError) as err:
        raise LambdaFileError(f"{lambda_file}: cannot rebuild its student ({err}); refit with train.py") from None
