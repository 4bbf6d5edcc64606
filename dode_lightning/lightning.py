"""Lightning edges of calibration: the teacher-target DataModule and the D-ODE LightningModule.

The math lives in `dode_lightning.distill` (plain tensor functions); this module only wires it to Lightning:
devices, logging, caching, and the fit loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
import warnings
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .atomic import atomic_path, writable_folder_error
from .errors import ConfigError
from .images import image_grid
from .checkpoints import CheckpointError, LoadedDenoiser, load_denoiser
from .checkpoints.errors import one_line
from .distill import (
    MAX_TEACHER_STEPS,
    SEED_LIMIT,
    SolverSetup,
    StageFit,
    build_teacher,
    evaluate_lambdas,
    fit_closed_form,
    global_stream_noise,
    holdout_mask,
    rmse,
    seeded_noise,
    stagewise_losses,
    teacher_on,
    teacher_targets,
)
from .denoisers import FirstStepMean, first_step_mean
from .figures import lambda_figure
from .grids import LEARNED_GRIDS, TEACHER_DP, check_sigmas
from .joint_fit import JointFit, JointFitDiverged, JointSettings, TeacherPath, hard_rows, stratified_weights
from .placement import Trajectory, one_step_costs, place_knots, placement_teacher, states_at, teacher_trajectory
from .lambda_file import schedule_id
from .schedules import Schedule
from .solvers import LambdaLayout, NFEError, Solver

__all__ = ["DODECalibration", "TeacherTargets", "lambda_file_contents", "ConfigError", "BuiltStudent", "build_student", "limit_threads_for_builtin", "image_grid"]

CACHE_VERSION = 2
# Hard seeds: the screening reference takes this many times the student's steps, placed on the teacher's trajectory
# with `teacher_dp` (it finds 47–49 of the 50 seeds worst against the exact ODE at NFE 4–10), else the
# student's teacher refined this many times; and the most seeds one run may screen.
HARD_REFERENCE_STEPS = 3
HARD_REFERENCE_SCALE = 5
MAX_POOL = 1_000_000


def limit_threads_for_builtin(loaded: LoadedDenoiser, device: torch.device) -> None:
    """One intra-op thread for the built-in exact model on CPU.

    Its einsums are far too small for intra-op threads; on a busy machine the thread pool's spin-waits make them
    10–100× slower than one thread.
    """
    if loaded.source.startswith("gmm_digits") and device.type == "cpu":
        torch.set_num_threads(1)


@dataclass
class BuiltStudent:
    """A loaded denoiser and the student solver a config's `model` section describes (shared by fit and sampling)."""

    loaded: LoadedDenoiser
    setup: SolverSetup
    solver: Solver
    dtype: torch.dtype

    def metadata(self) -> dict[str, Any]:
        """What determines the student (also the λ file's identity fields)."""
        return {
            "solver": self.setup.name,
            "nfe": self.solver.nfe,
            "num_stages": self.solver.num_stages,
            "grid": self.setup.grid,
            "grid_kwargs": self.setup.grid_kwargs,
            "schedule": schedule_id(self.setup.schedule),
            "prediction": self.solver.prediction,
            "denoiser": self.loaded.identity,
            "state_dtype": str(self.dtype).replace("torch.", ""),
            **self.loaded.conditioning,  # guidance_scale and prompt source of a text-conditional pipeline
            **self._timestep_rounding(),
        }

    def _timestep_rounding(self) -> dict[str, bool]:
        """`integer_timesteps` of a discrete-time denoiser (ComfyUI and diffusers' samplers need it True)."""
        rounding = getattr(self.loaded.denoiser, "integer_timesteps", None)
        return {} if rounding is None else {"integer_timesteps": bool(rounding)}


def build_student(
    denoiser: dict[str, Any] | LoadedDenoiser | None,
    solver: str,
    nfe: int,
    grid: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    state_dtype: str = "float64",
    grid_kwargs: dict[str, Any] | None = None,
    terminal_zero: bool | None = None,
    sigmas: Tensor | Callable[[Schedule], Tensor] | None = None,
) -> BuiltStudent:
    """Load the denoiser (default: the built-in exact model; a `LoadedDenoiser` is used as it is) and build the
    student; bad settings → ConfigError.

    `grid_kwargs`: the complete grid settings as a λ file records them (with an explicit `grid`); sigma_min,
    sigma_max, rho and terminal_zero given as well override them. `sigmas`: the step boundaries themselves (a λ
    file's), or a function of the denoiser's schedule that gives them; `grid` and `grid_kwargs` then only record
    how they were chosen.
    """
    denoiser = denoiser or {"source": "gmm_digits"}
    if isinstance(denoiser, LoadedDenoiser):
        loaded = denoiser
    elif not isinstance(denoiser, dict) or "source" not in denoiser:
        raise ConfigError(f"the denoiser section must be a mapping with a source (edm_pickle, diffusers or gmm_digits), got {one_line(repr(denoiser), 80)}")
    else:
        try:
            loaded = load_denoiser(**denoiser)
        except CheckpointError:
            raise
        except ValueError as err:  # unknown source or option, a path where none is taken: the config's fault
            raise ConfigError(f"denoiser section: {err}") from None
    loaded.denoiser.eval().requires_grad_(False)
    overrides = (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho), ("terminal_zero", terminal_zero))
    grid_kwargs = {**(grid_kwargs or {}), **{k: v for k, v in overrides if v is not None}}
    if callable(sigmas):
        sigmas = sigmas(loaded.schedule)
    if sigmas is None and grid in LEARNED_GRIDS:
        raise ConfigError(f"grid {grid!r} is placed by calibration (train.py); sample it with the λ file train.py wrote")
    try:
        setup = SolverSetup.resolve(solver, nfe, loaded.schedule, grid, sigmas, **grid_kwargs)
        student: Solver = setup.build()
    except (NFEError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if state_dtype not in ("float32", "float64"):
        raise ConfigError(f"state_dtype must be float32 or float64, got {state_dtype!r}")
    return BuiltStudent(loaded, setup, student, getattr(torch, state_dtype))


def own_direction(lambdas: Tensor) -> Tensor:
    """Per stage, the λ of Δ_k itself (averaged over groups): the paper's λ, for logs and plots of any layout."""
    return lambdas if lambdas.dim() == 1 else lambdas[:, 0].mean(-1)


# Settings that only one fit or grid reads, by prefix, and when they apply: set elsewhere they are ignored, which
# says so (a typo'd or forgotten fit or grid would otherwise pass unnoticed).
_WHEN_APPLIES = {
    "joint": "they configure --model.fit joint only",
    "adam": "they configure --model.fit adam or compare only",
    "dp": "they configure --model.grid teacher_dp only",
}


def _settings_that_do_not_apply(hparams: Mapping[str, Any]) -> dict[str, list[str]]:
    """By prefix, the `joint_*`, `adam_*` and `dp_*` settings given a non-default value where their fit or grid is
    not used (a warning, not an error: a config may keep them for switching `fit` or `grid` on the command line)."""
    applies = {"joint": hparams["fit"] == "joint", "adam": hparams["fit"] in ("adam", "compare"), "dp": hparams["grid"] == TEACHER_DP}
    defaults = inspect.signature(DODECalibration.__init__).parameters
    unused: dict[str, list[str]] = {}
    for name, value in hparams.items():
        prefix = name.split("_")[0]
        if prefix in applies and not applies[prefix] and name in defaults and value != defaults[name].default:
            unused.setdefault(prefix, []).append(name)
    return unused


class DODECalibration(pl.LightningModule):
    """Fits the λ of a D-ODE solver for a frozen denoiser against cached teacher targets.

    Args:
        denoiser: the `denoiser:` section, keyword arguments of `load_denoiser` (`source`, `path`, options).
        solver: student solver.
        nfe: network evaluations of the student.
        grid: time grid (default: the solver's default for the schedule).
        sigma_min: smallest σ of the grid (default: the solver's default).
        sigma_max: largest σ of the grid (default: the solver's default).
        rho: Karras grid exponent (default 7).
        terminal_zero: whether the grid's last step goes to σ = 0 (default, the paper's N points + 0) or the grid
            ends at sigma_min (false: N + 1 points, the last state is the one at sigma_min).
        fit: `closed_form` (the paper's sequential least squares), `adam` (gradient fit of the same per-stage
            objective), `compare` (both; the closed-form λ are kept), or `joint` (step positions and λ together,
            end to end against the teacher's final state, from the closed form on the configured grid).
        adam_lr: Adam learning rate (λ in units of each stage's natural scale).
        adam_steps: Adam iterations.
        state_dtype: dtype of solver states (EDM side: float64 officially).
        output: where to write the λ file (default: `<log dir>/lambdas.safetensors`).
        history: directions per stage's correction: Δ_k and the Δ of up to history − 1 earlier stages (1 = the
            paper's D-solver; each stage then solves an m×m least-squares system).
        lambda_groups: `none` (one λ per direction), `channel` (one per image channel) or `blocks:N` (one per
            N × N spatial block and channel).
        guard: fraction of the calibration seeds held out by the never-worse guard (0 = off; closed form and
            joint): a stage whose λ does not lower their loss keeps λ = 0; the joint fit keeps its best iterate on them.
        joint_optimizer: `lbfgs` (full batch, strong Wolfe line search) or `adam`, for fit `joint`.
        joint_steps: joint-fit iterations.
        joint_lr: joint-fit learning rate (L-BFGS: initial step length, 1 = the quasi-Newton step).
        joint_coordinate: where the steps are spread: `log` (log σ, fixed σ_min), `karras` (σ^{1/ρ}; on a grid
            ending in 0 the last positive σ moves too) or `flow` (flow time t = σ/(1+σ); needed from σ = ∞).
        joint_lambdas: fit λ together with the steps (false: steps only, λ stay at the closed form).
        joint_intermediate: weight of the per-stage errors to the teacher trajectory (0 = final state only).
        joint_slack: LD3's soft teacher forcing: radius of the ball each calibration latent may move in (0 = off;
            one process only).
        joint_refit: after the joint fit, refit λ in closed form on the fitted σ (with `joint_lambdas: false`:
            steps fitted end to end with λ held, then λ by the paper's least squares on them).
        joint_pool: hard seeds for the joint fit (0 = off): the closed-form student and a 3×-step reference sample
            seeds data.seed … data.seed + joint_pool − 1 (the batch's own included); the `joint_hard` seeds where they
            disagree most join the fit with their teacher endpoints, weighted so that the final-state loss still
            estimates the pool's mean squared error (few-step RMSE is carried by about 1 % of the seeds, which a batch
            of 100 rarely holds). One process only.
        joint_hard: how many of the pool's hardest seeds join the joint fit.
        first_step: `network` (default) or `mean`: the student's first evaluation, at σ_max, is answered by the mean
            x̂₀ of the calibration batch there (stored in the λ file), so `nfe` network calls drive nfe + 1 solver
            steps (the analytical first step of AMED-Solver/GITS, with the data-aware mean instead of zero).
            Unconditional models only (x̂₀ at σ_max is the class's or prompt's mean otherwise).
        dp_steps: `grid: teacher_dp` only: M, the steps of the teacher's fine grid (the solver's default grid kind
            with sigma_min, sigma_max, rho, terminal_zero) on which the student's steps are placed.
        dp_coefficient: `grid: teacher_dp` only: c in the placement objective Σ_n c^n·cost_n (1: plain sum; > 1
            weighs the later, low-noise steps more).
        dp_seeds: `grid: teacher_dp` only: average the one-step errors over this many seeds from data.seed, the
            batch's own first (0: the batch only); those after the batch cost one more fine-grid teacher run each.
            The placement picks among the fine grid's points, and a batch of 100 can tip that discrete choice.

    `grid: teacher_dp` places the steps GITS-like (`dode_lightning.placement`): the teacher (data.teacher, default
    iPNDM) runs once on the fine grid, dynamic programming picks the student's σ among its grid points by one-step
    errors, and the λ targets are the teacher's states at them (data.scale and data.target_mode do not apply).
    """

    def __init__(
        self,
        denoiser: dict[str, Any] | None = None,
        solver: str = "heun",
        nfe: int = 9,
        grid: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        terminal_zero: bool | None = None,
        fit: Literal["closed_form", "adam", "compare", "joint"] = "closed_form",
        adam_lr: float = 0.1,
        adam_steps: int = 300,
        state_dtype: Literal["float32", "float64"] = "float64",
        output: str | None = None,
        history: int = 1,
        lambda_groups: str = "none",
        guard: float = 0.0,
        joint_optimizer: Literal["lbfgs", "adam"] = "lbfgs",
        joint_steps: int = 30,
        joint_lr: float = 1.0,
        joint_coordinate: Literal["log", "karras", "flow"] = "log",
        joint_lambdas: bool = True,
        joint_intermediate: float = 0.0,
        joint_slack: float = 0.0,
        joint_refit: bool = False,
        joint_pool: int = 0,
        joint_hard: int = 50,
        first_step: Literal["network", "mean"] = "network",
        dp_steps: int = 100,
        dp_coefficient: float = 1.0,
        dp_seeds: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if grid == TEACHER_DP and not (2 <= dp_steps <= MAX_TEACHER_STEPS and dp_coefficient > 0):
            raise ConfigError(f"teacher_dp needs 2 ≤ dp_steps ≤ {MAX_TEACHER_STEPS} and dp_coefficient > 0 (GITS: 100 and about 1), got {dp_steps} and {dp_coefficient}")
        if dp_seeds < 0:
            raise ConfigError(f"dp_seeds counts seeds (0: the calibration batch only), got {dp_seeds}")
        if fit not in ("closed_form", "adam", "compare", "joint"):
            raise ConfigError(f"unknown fit method {fit!r}; choose closed_form, adam, compare or joint")
        if joint_steps < 1:
            raise ConfigError(f"the joint fit needs joint_steps ≥ 1, got {joint_steps}")
        if joint_pool:
            if fit != "joint":
                raise ConfigError(f"joint_pool picks hard seeds for the joint fit; set --model.fit joint or --model.joint_pool 0 (fit is {fit})")
            if joint_hard < 1 or joint_pool > MAX_POOL:
                raise ConfigError(f"hard seeds need joint_hard ≥ 1 and joint_pool ≤ {MAX_POOL:,}, got {joint_hard} and {joint_pool}")
        for prefix, names in _settings_that_do_not_apply(self.hparams).items():
            warnings.warn(f"{', '.join(names)} ignored: {_WHEN_APPLIES[prefix]} (fit is {fit}, grid {grid or 'the solver default'})", stacklevel=2)
        try:
            self.joint_settings = JointSettings(joint_optimizer, joint_lr, joint_coordinate, rho or 7.0, joint_lambdas, joint_intermediate, joint_slack)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if adam_steps < 1 or adam_lr <= 0:
            raise ConfigError(f"adam needs adam_steps ≥ 1 and adam_lr > 0, got {adam_steps} and {adam_lr}")
        if not 0.0 <= guard < 1.0:
            raise ConfigError(f"guard is the held-out fraction of the calibration seeds, in [0, 1); got {guard}")
        if guard and fit == "adam":
            raise ConfigError("the never-worse guard works with the closed-form fit; use --model.fit closed_form or compare")
        try:
            self.layout = LambdaLayout(history, lambda_groups)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if first_step not in ("network", "mean"):
            raise ConfigError(f"unknown first_step {first_step!r}; choose network or mean")
        self.placement = grid == TEACHER_DP
        # teacher_dp: the student starts on the solver's default grid, whose kind and ends the fine grid shares.
        # first_step mean: nfe network calls drive nfe + 1 solver steps (the first answered by the stored mean).
        steps = nfe + 1 if first_step == "mean" else nfe
        self.built = build_student(denoiser, solver, steps, None if self.placement else grid, sigma_min, sigma_max, rho, state_dtype, terminal_zero=terminal_zero)
        self.loaded, self.setup_spec, self.student = self.built.loaded, self.built.setup, self.built.solver
        self.placement_base = self.setup_spec
        if not any(self.student.lambda_fitted):
            raise ConfigError(
                f"{solver} with NFE {self.student.nfe} has no λ to fit (its only stage has no earlier direction d_k − d_(k−1)); "
                "use a larger --model.nfe"
            )
        self.denoiser = self.loaded.denoiser
        self.fit_method = fit
        self.dtype_ = self.built.dtype
        self.image_shape = tuple(self.loaded.image_shape)
        self.lambdas = nn.Parameter(torch.zeros(self.layout.shape(self.student.num_stages, self.image_shape), dtype=torch.float64))
        # Adam runs on λ_k / c_k (c_k: StageFit.natural_scales at λ = 0); folded back into λ when the fit ends.
        self.register_buffer("lambda_scale", torch.ones(self.student.num_stages, dtype=torch.float64), persistent=False)
        self.automatic_optimization = False
        self.adam_iterations = 0
        self.closed_form: StageFit | None = None
        self.timings: dict[str, float] = {}
        self.comparison: dict[str, Any] = {}
        self.teacher_rmse: dict[str, float] = {}
        self.fit_bar: tqdm | None = None
        self.joint: JointFit | None = None
        # Kept out of the module tree (it wraps the same frozen network): what the student's evaluations go to.
        self.__dict__["student_denoiser"] = self.denoiser

    def metadata(self) -> dict[str, Any]:
        """What determines the student (also the λ file's identity fields)."""
        return self.built.metadata()

    def set_first_step(self, noise: Tensor) -> None:
        """`first_step: mean`: the batch mean of x̂₀ at the student's first evaluation request (pooled over ranks), and
        the student's denoiser that answers that request with it."""
        request = next(self.student.stages(self.student.init_state(noise)))
        total = self._pool(first_step_mean(self.denoiser, request.x, request.sigma, request.scale).cpu() * len(noise))
        count = self._pool(torch.tensor(float(len(noise)), dtype=torch.float64))
        self.__dict__["student_denoiser"] = FirstStepMean(self.denoiser, float(request.sigma), total / count)

    def network_nfe(self) -> int:
        """Network calls per sample of the student (its stages, less the first with `first_step: mean`)."""
        return self.student.nfe - (1 if self.hparams.first_step == "mean" else 0)

    def placement_settings(self) -> dict[str, Any] | None:
        """How `teacher_dp` places the steps (None for a named grid)."""
        if not self.placement:
            return None
        base = self.placement_base
        settings = {**base.grid_kwargs, "dp_grid": base.grid, "dp_steps": self.hparams.dp_steps, "dp_coefficient": self.hparams.dp_coefficient}
        return settings | ({"dp_seeds": self.hparams.dp_seeds} if self.hparams.dp_seeds else {})

    def place(self, sigmas: Tensor, teacher: str) -> None:
        """Move the student onto the σ `teacher_dp` placed with `teacher` (same stage count, so λ keep their shape)."""
        setup = self.placement_base.on(sigmas, TEACHER_DP, **self.placement_settings(), dp_teacher=teacher)
        self.built = dataclasses.replace(self.built, setup=setup, solver=setup.build())
        self.setup_spec, self.student = self.built.setup, self.built.solver

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.lambdas], lr=self.hparams.adam_lr)

    def metadata_lambdas(self) -> dict[str, Any]:
        """What the λ hold (recorded in the λ file; sampling expands λ with it)."""
        # The joint fit moves λ the guard had set to 0 (unless λ are refitted in closed form afterwards).
        joint_lambdas = self.joint is not None and not self.hparams.joint_refit
        dropped = [] if self.closed_form is None or joint_lambdas else self.closed_form.dropped
        first = {} if self.hparams.first_step == "network" else {"first_step": "mean", "network_nfe": self.network_nfe()}
        return {"history": self.layout.history, "lambda_groups": self.layout.groups, "guard": self.hparams.guard, "dropped_stages": dropped, **first}

    def scaled_lambdas(self) -> Tensor:
        """λ in paper units: the Adam parameters times each stage's natural scale."""
        return self.lambdas * self.lambda_scale.reshape(-1, *[1] * (self.lambdas.dim() - 1))

    def applied_lambdas(self) -> Tensor:
        """The current λ as `Solver.sample` takes them."""
        return self.layout.expand(self.lambdas.detach(), self.image_shape)

    def _pool(self, value: Tensor) -> Tensor:
        """Sum over ranks (the pooled fit of method.md §1); identity on one process."""
        if self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.to(self.device), reduce_op="sum").cpu()

    def run_closed_form(self, noise: Tensor, labels: Tensor | None, targets: Tensor) -> StageFit:
        start = time.perf_counter()
        holdout = holdout_mask(self.trainer.datamodule.rank_seeds(), self.hparams.guard) if self.hparams.guard else None
        result = fit_closed_form(self.student, self.student_denoiser, noise, targets, labels, self._pool, self.layout, holdout)
        self.timings["closed_form"] = self.timings.get("closed_form", 0.0) + time.perf_counter() - start
        return result

    def on_train_start(self) -> None:
        steps = {"closed_form": 1, "joint": self.hparams.joint_steps}.get(self.fit_method, self.hparams.adam_steps)
        self.fit_bar = tqdm(total=steps, desc=f"fit ({self.fit_method})", disable=self.global_rank != 0)
        if self.hparams.first_step == "mean":
            self.set_first_step(self.trainer.datamodule.full_batch(self.device)[0])
        if self.fit_method in ("compare", "joint"):
            self.closed_form = self.run_closed_form(*self.trainer.datamodule.full_batch(self.device))
        if self.fit_method == "joint":
            self.start_joint()

    def start_joint(self) -> None:
        """The joint fit from the closed form on the configured grid, against the teacher's final state."""
        if self.hparams.joint_slack and self.trainer.world_size > 1:
            raise ConfigError("joint_slack moves each calibration latent and works on one process; set --model.joint_slack 0 or --trainer.devices 1")
        data = self.trainer.datamodule
        noise, labels, targets = data.full_batch(self.device)
        final, seeds, weights = targets[-1], data.rank_seeds(), None
        start = time.perf_counter()
        hard = data.hard_seeds(self, self.closed_form.lambdas) if self.hparams.joint_pool else None
        if hard is not None:
            noise, final, seeds, weights = torch.cat([noise, hard.noise]), torch.cat([final, hard.final]), seeds + hard.seeds, hard.weights
            labels = None if labels is None else torch.cat([labels, hard.labels])
        holdout = holdout_mask(seeds, self.hparams.guard) if self.hparams.guard else None
        path = data.trajectory(self, hard) if self.hparams.joint_intermediate else None
        try:
            self.joint = JointFit(
                self.setup_spec.name, self.student.sigmas, self.setup_spec.schedule, self.student_denoiser, noise, final, self.closed_form.lambdas,
                self.layout, self.joint_settings, labels, self.closed_form.natural_scales(), holdout, path, self._pool, weights,
            )
        except ValueError as err:  # a grid the joint fit cannot spread (e.g. from σ = ∞ in log σ)
            raise ConfigError(str(err)) from None
        self.timings["joint"] = time.perf_counter() - start

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        noise, labels, targets = batch
        labels = labels if labels.shape[-1] else None
        targets = targets.transpose(0, 1)  # (B, K, …) → (K, B, …)
        if self.fit_method == "joint":
            self.joint_step()
            return
        if self.fit_method == "closed_form":
            self.closed_form = self.run_closed_form(noise, labels, targets)
            with torch.no_grad():
                self.lambdas.copy_(self.closed_form.lambdas)
            self.fit_bar.update(1)
            self.trainer.should_stop = True
            return
        start = time.perf_counter()
        if self.adam_iterations == 0:
            with torch.no_grad():
                at_zero = evaluate_lambdas(self.student, self.student_denoiser, noise, targets, torch.zeros_like(self.lambdas), labels, self._pool, self.layout)
                self.lambda_scale.copy_(at_zero.natural_scales())
        optimizer = self.optimizers()
        optimizer.zero_grad()
        losses = stagewise_losses(self.student, self.student_denoiser, noise, targets, self.scaled_lambdas(), labels, self.layout)
        self.manual_backward(losses.sum())
        optimizer.step()
        self.adam_iterations += 1
        self.timings["adam"] = self.timings.get("adam", 0.0) + time.perf_counter() - start
        total = losses.sum().detach()
        self._log_stage_values(losses.detach())
        self.log("loss/total", total, on_step=True, batch_size=len(noise))
        self.fit_bar.update(1)
        self.fit_bar.set_postfix(loss=f"{float(total):.3e}", refresh=False)
        if self.adam_iterations >= self.hparams.adam_steps:
            self.trainer.should_stop = True

    def joint_step(self) -> None:
        """One joint-fit iteration; a diverging fit stops the run in one line (no λ file)."""
        start = time.perf_counter()
        try:
            loss = self.joint.step()
        except JointFitDiverged as err:
            self.fit_bar.close()  # the one-line error starts on its own line
            raise ConfigError(str(err)) from None
        self.timings["joint"] += time.perf_counter() - start
        self._log_joint()
        self.fit_bar.update(1)
        self.fit_bar.set_postfix(loss=f"{loss:.3e}", refresh=False)
        if self.joint.iterations >= self.hparams.joint_steps:
            self.trainer.should_stop = True

    def _log_joint(self) -> None:
        """σ_k, λ_k (own direction) and the losses of the current joint iterate."""
        sigmas, lambdas = self.joint.sigmas().detach(), own_direction(self.joint.lambdas().detach())
        values = {"step": float(self.joint.iterations)}  # the x-axis, so Lightning adds no `epoch` scalar
        values.update({f"sigma/{k:02d}": sigmas[k].float() for k in range(len(sigmas)) if float(sigmas[k]) > 0})
        values.update({f"lambda/stage_{k:02d}": lambdas[k].float() for k, free in enumerate(self.student.lambda_fitted) if free})
        values["loss/final_state"] = torch.tensor(self.joint.last_loss, dtype=torch.float32)
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def finish_joint(self) -> None:
        """Adopt the best joint iterate: the student on the fitted σ, its λ, and aligned teacher targets there (one more
        teacher run) so the stage table and the λ file describe the student that was fitted."""
        result = self.joint.result()
        self.joint_result = result
        start, settings = self.setup_spec, self.joint_settings
        # The λ file records the fitted σ under grid "joint", with the grid the fit started from and its settings.
        self.setup_spec = start.on(result.sigmas, "joint", start_grid=start.grid, **start.grid_kwargs, coordinate=settings.coordinate, iterations=result.iterations)
        self.student = self.setup_spec.build()
        self.built = dataclasses.replace(self.built, setup=self.setup_spec, solver=self.student)
        with torch.no_grad():
            self.lambdas.copy_(result.lambdas)
        self.trainer.datamodule.retarget(self)
        if self.hparams.joint_refit:  # one more block step: λ in closed form on the fitted σ (guard as configured)
            self.closed_form = self.run_closed_form(*self.trainer.datamodule.full_batch(self.device))
            with torch.no_grad():
                self.lambdas.copy_(self.closed_form.lambdas)

    def _log_stage_values(self, losses: Tensor) -> None:
        """λ and loss of every stage at this Adam step (the closed form's one step is in the end-of-fit summary).
        `step` sets the x-axis, so Lightning adds no `epoch` scalar."""
        values = {"step": float(self.adam_iterations)}
        for k, free in enumerate(self.student.lambda_fitted):
            if free:
                values[f"lambda/stage_{k:02d}"] = own_direction(self.scaled_lambdas().detach())[k].float()
                values[f"loss/stage_{k:02d}"] = losses[k].float()
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def evaluate(self) -> StageFit:
        """Per-stage statistics of the current λ on the whole (pooled) calibration set."""
        noise, labels, targets = self.trainer.datamodule.full_batch(self.device)
        return evaluate_lambdas(self.student, self.student_denoiser, noise, targets, self.lambdas.detach(), labels, self._pool, self.layout)

    def on_train_end(self) -> None:
        self.fit_bar.close()
        if self.joint is not None:
            self.finish_joint()
        else:
            with torch.no_grad():
                self.lambdas.copy_(self.scaled_lambdas())
                self.lambda_scale.fill_(1.0)
        if self.fit_method == "compare" and self.closed_form is not None:
            self.comparison = {
                "closed_form": self.closed_form,
                "adam": self.evaluate(),
                "closed_form_seconds": self.timings.get("closed_form", 0.0),
                "adam_seconds": self.timings.get("adam", 0.0),
                "adam_iterations": self.adam_iterations,
            }
            with torch.no_grad():
                self.lambdas.copy_(self.closed_form.lambdas)
        self._log_figures()

    def _log_figures(self) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "experiment") or self.global_rank != 0:
            return
        writer = logger.experiment
        fig = lambda_figure(
            own_direction(self.lambdas.detach().cpu()), float(self.student.sigmas[0]), self.student.target_sigmas, self.student.lambda_fitted,
            f"{self.setup_spec.name}, NFE {self.student.nfe}",
        )
        writer.add_figure("lambda_vs_sigma", fig, global_step=self.global_step)
        noise, labels, targets = self.trainer.datamodule.full_batch(self.device)
        noise, labels, targets = noise[:64], None if labels is None else labels[:64], targets[:, :64]
        with torch.no_grad():
            base = self.student.sample(self.student_denoiser, noise, class_labels=labels)
            d_student = self.student.sample(self.student_denoiser, noise, self.applied_lambdas(), labels)
        # RMSE of the finished students to the teacher's endpoint on these seeds (latents, before any decoding).
        self.teacher_rmse = {"base": rmse(base, targets[-1]), "d": rmse(d_student, targets[-1]), "seeds": len(noise)}
        decoder = self.loaded.decoder
        for tag, images in (("teacher", targets[-1]), ("base_student", base), ("d_student", d_student)):
            if decoder is not None:  # latent model: the VAE decodes 16 of them, 4 per call (after the fit, images only)
                with torch.no_grad():
                    images = torch.cat([decoder.to(images.device)(chunk) for chunk in images[:16].split(4)])
            writer.add_image(f"samples/{tag}", image_grid(images.cpu()), global_step=self.global_step)
        writer.flush()


def lambda_file_contents(module: DODECalibration, data: "TeacherTargets", fit: StageFit) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of the λ file of a finished calibration (`fit`: its final per-stage statistics)."""
    metadata = {**module.metadata(), **data.metadata(module), "fit": module.fit_method, **module.metadata_lambdas()}
    tensors = {
        "lambdas": module.lambdas.detach().cpu(),
        "coeffs": fit.coeffs,
        "sigmas": module.student.sigmas.detach(),
        "eval_sigmas": fit.sigmas,
        "target_sigmas": module.student.target_sigmas.detach(),
        "lambda_fitted": torch.tensor(module.student.lambda_fitted),
    }
    if isinstance(module.student_denoiser, FirstStepMean):
        tensors["first_denoised"] = module.student_denoiser.denoised.cpu()
    return tensors, metadata


@dataclass
class HardSeeds:
    """Hard seeds from outside the calibration batch for the joint fit, and the weights of the fit's rows (the batch's
    rows, then these)."""

    seeds: list[int]
    noise: Tensor
    labels: Tensor | None
    final: Tensor
    """The teacher's endpoint of each (B_hard, …)."""
    weights: Tensor


class TeacherTargets(pl.LightningDataModule):
    """Calibration latents and the teacher states the student's stages are compared with.

    Args:
        scale: C, teacher evaluations per student evaluation (≥ 2).
        batch_size: |B|, calibration samples.
        seed: first seed; the batch uses seeds seed … seed + |B| − 1, split across ranks.
        noise: `per_seed` (default: one generator per seed, as EDM's generate.py; a sample depends only on its
            seed) or `global_stream` (the official noise-side draw `torch.manual_seed(seed); torch.randn(|B|, C, H, W)`
            on the CPU; rank r takes rows r, r + W, … of that one batch, so the pooled fit sees the same union batch).
        target_mode: `aligned` (default; targets at the student states' noise levels) or `paper` (official index rule).
        teacher: teacher solver (default: Euler/DDIM, iPNDM and DEIS their own family; UniPC-3 when model.history > 1
            with aligned targets).
        class_conditional: draw labels (default: when the denoiser has labels).
        adam_batch_size: minibatch for the Adam fit.
        cache_dir: where teacher targets are cached (null: no cache).
    """

    def __init__(
        self,
        scale: int = 10,
        batch_size: int = 100,
        seed: int = 0,
        noise: Literal["per_seed", "global_stream"] = "per_seed",
        target_mode: Literal["aligned", "paper"] = "aligned",
        teacher: str | None = None,
        class_conditional: bool | None = None,
        adam_batch_size: int = 100,
        cache_dir: str | None = "runs/cache",
    ) -> None:
        super().__init__()
        if scale < 2:
            raise ConfigError(f"the teacher scale C must be ≥ 2 (the paper uses 10), got {scale}")
        if batch_size < 1 or adam_batch_size < 1:
            raise ConfigError(f"batch sizes must be ≥ 1, got batch_size={batch_size}, adam_batch_size={adam_batch_size}")
        if not 0 <= seed <= SEED_LIMIT - batch_size:
            raise ConfigError(f"calibration seeds {seed} … {seed + batch_size - 1} must lie in 0 … {SEED_LIMIT - 1} (32-bit generator seeds); lower data.seed")
        if noise not in ("per_seed", "global_stream"):
            raise ConfigError(f"unknown noise {noise!r}; choose per_seed or global_stream")
        if noise == "global_stream" and not 0 <= seed < 1 << 64:
            raise ConfigError(f"the global_stream seed must be in 0 … 2⁶⁴ − 1 (torch.manual_seed's range), got {seed}")
        self.scale, self.batch_size, self.seed, self.noise = scale, batch_size, seed, noise
        self.target_mode, self.teacher_name = target_mode, teacher
        self.class_conditional, self.adam_batch_size = class_conditional, adam_batch_size
        self.cache_dir = cache_dir
        self.data: TensorDataset | None = None
        self.teacher_seconds = 0.0
        self.teacher_nfe = 0
        self.placement_evaluations = 0
        self.cache_hit = False
        self.hard: dict[str, Any] | None = None
        self.reference_sigmas: Tensor | None = None

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.batch_size))

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def rank_seeds(self) -> list[int]:
        rank, world = self._rank_and_world()
        return self.seeds[rank::world]

    def calibration_noise(
        self, shape: tuple[int, ...], label_dim: int, dtype: torch.dtype = torch.float64, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor | None]:
        """Calibration latents and one-hot labels (None without labels): rank's share of W ranks, every W-th sample
        (default: the whole batch)."""
        if self.noise == "per_seed":
            return seeded_noise(self.seeds[rank::world], shape, label_dim, dtype)
        noise, labels = global_stream_noise(self.seed, self.batch_size, shape, label_dim, dtype)
        return noise[rank::world], None if labels is None else labels[rank::world]

    def teacher_for(self, module: DODECalibration) -> str | None:
        """The configured teacher; for the joint fit by default UniPC-3, whose final state is the most accurate."""
        return self.teacher_name or ("unipc_3" if module.fit_method == "joint" else None)

    def teacher(self, module: DODECalibration) -> tuple[Solver, list[int] | None]:
        """The teacher and the indices of its states that are the targets (`teacher_dp`: its whole fine-grid run, the
        indices follow from the placement)."""
        if module.placement:
            return placement_teacher(module.student, module.placement_base, module.hparams.dp_steps, self.teacher_name), None
        return build_teacher(module.student, module.setup_spec, self.scale, self.target_mode, self.teacher_for(module), module.layout.history)

    def metadata(self, module: DODECalibration) -> dict[str, Any]:
        teacher, _ = self.teacher(module)
        return {
            "teacher": teacher.name,
            "teacher_nfe": teacher.nfe,
            "scale": self.scale,
            "batch_size": self.batch_size,
            "target_mode": self.target_mode,
            "seeds": [self.seed, self.seed + self.batch_size - 1],
            "noise": self.noise,
            "class_conditional": self._conditional(module),
            **({} if self.hard is None else {"hard_seeds": self.hard["seeds"], "hard_pool": self.hard["pool"]}),
        }

    def _conditional(self, module: DODECalibration) -> bool:
        if self.class_conditional is None:
            return module.loaded.label_dim > 0
        if self.class_conditional and module.loaded.label_dim == 0:
            raise ConfigError("class_conditional is true but the denoiser has no class labels")
        return self.class_conditional

    def setup(self, stage: str) -> None:
        if self.data is not None:
            return
        module: DODECalibration = self.trainer.lightning_module
        self._check_seed_settings(module)
        try:
            teacher, indices = self.teacher(module)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.teacher_nfe = teacher.nfe
        label_dim = module.loaded.label_dim if self._conditional(module) else 0
        seeds = self.rank_seeds()
        key = self._cache_key(module, teacher, seeds, label_dim)
        shapes = {
            "noise": (len(seeds), *module.loaded.image_shape),
            "labels": (len(seeds), label_dim) if label_dim else None,
            "targets": (module.student.num_stages, len(seeds), *module.loaded.image_shape),
            "sigmas": (len(module.student.sigmas),) if module.placement else None,
            "reference_sigmas": (self._reference_steps(module) + 1,) if module.placement else None,
        }
        cached = self._load_cache(key, shapes, module.dtype_)
        if cached is not None:
            noise, labels, targets, sigmas, self.reference_sigmas = cached
            self.cache_hit = True
            if module.placement:
                module.place(sigmas, teacher.name)
        else:
            self._check_cache_writable(key)  # before the teacher runs, not after
            noise, labels = self.calibration_noise(module.loaded.image_shape, label_dim, module.dtype_, *self._rank_and_world())
            start = time.perf_counter()
            with tqdm(total=teacher.num_stages, desc=f"teacher ({teacher.name}, NFE {teacher.nfe})", disable=self.trainer.global_rank != 0) as bar:
                with torch.no_grad():
                    noise_on, labels_on = noise.to(module.device), None if labels is None else labels.to(module.device)
                    if module.placement:
                        trajectory = teacher_trajectory(teacher, module.denoiser, noise_on, labels_on, lambda _j: bar.update(1))
                        self._check_finite(teacher, trajectory.states)
                        costs = one_step_costs(chain([trajectory], self._placement_runs(module, teacher, label_dim)), module._pool)
                        sigmas = trajectory.sigmas[place_knots(costs, len(module.student.sigmas) - 1, module.hparams.dp_coefficient)]
                        self.reference_sigmas = trajectory.sigmas[place_knots(costs, self._reference_steps(module), module.hparams.dp_coefficient)]
                        module.place(sigmas, teacher.name)
                        targets = states_at(trajectory, module.student.target_sigmas).cpu()
                    else:
                        sigmas = None
                        targets = teacher_targets(teacher, indices, module.denoiser, noise_on, labels_on, lambda _j: bar.update(1)).cpu()
            self.teacher_seconds = time.perf_counter() - start
            self._check_finite(teacher, targets)
            self._save_cache(key, noise, labels, targets, sigmas, self.reference_sigmas)
        labels = labels if labels is not None else noise.new_zeros(len(noise), 0)
        self.data = TensorDataset(noise, labels, targets.transpose(0, 1).contiguous())

    def _placement_runs(self, module: DODECalibration, teacher: Solver, label_dim: int) -> Iterator[Trajectory]:
        """The placement teacher on this rank's share of the `dp_seeds` seeds after the batch, a batch at a time (each
        run is released once its one-step errors are summed)."""
        rank, world = self._rank_and_world()
        seeds = list(range(self.seed + self.batch_size, self.seed + module.hparams.dp_seeds))[rank::world]
        chunks = range(0, len(seeds), self.batch_size)
        for chunk in tqdm(chunks, desc=f"placement ({teacher.name}, NFE {teacher.nfe}) on {len(seeds)} more seeds", disable=not seeds or rank != 0):
            noise, labels = seeded_noise(seeds[chunk : chunk + self.batch_size], module.loaded.image_shape, label_dim, module.dtype_)
            start = time.perf_counter()
            with torch.no_grad():
                run = teacher_trajectory(teacher, module.denoiser, noise.to(module.device), None if labels is None else labels.to(module.device))
            self.teacher_seconds += time.perf_counter() - start
            self._check_finite(teacher, run.states)
            self.placement_evaluations += teacher.nfe * len(noise)
            yield run

    def hard_seeds(self, module: DODECalibration, lambdas: Tensor) -> "HardSeeds":
        """The joint fit's hard seeds (`model.joint_pool`): screen the pool with the closed-form student against a
        reference (`HARD_REFERENCE_STEPS`× its steps placed on the teacher's trajectory with `teacher_dp`, else its
        teacher refined `HARD_REFERENCE_SCALE` times), keep the `joint_hard` seeds where they disagree most, and give
        those outside the batch their teacher endpoints (the batch's own teacher, one run on them only)."""
        pool, count = module.hparams.joint_pool, module.hparams.joint_hard
        label_dim = module.loaded.label_dim if self._conditional(module) else 0
        seeds = list(range(self.seed, self.seed + pool))
        if module.placement:
            reference = teacher_on(self.teacher(module)[0].name, self.reference_sigmas, module.student, module.setup_spec.schedule, [1] * (len(self.reference_sigmas) - 1))
        else:
            reference, _ = build_teacher(module.student, module.setup_spec, HARD_REFERENCE_SCALE, "aligned", self.teacher_for(module), module.layout.history)
        applied = module.layout.expand(lambdas, module.image_shape)
        student_final, reference_final = [], []
        start = time.perf_counter()
        with torch.no_grad():
            for chunk in range(0, pool, self.batch_size):
                noise, labels = seeded_noise(seeds[chunk : chunk + self.batch_size], module.loaded.image_shape, label_dim, module.dtype_)
                noise, labels = noise.to(module.device), None if labels is None else labels.to(module.device)
                student_final.append(module.student.sample(module.student_denoiser, noise, applied, labels).cpu())
                reference_final.append(reference.sample(module.denoiser, noise, class_labels=labels).cpu())
            hard = sorted(int(i) for i in hard_rows(torch.cat(student_final), torch.cat(reference_final), count))
            outside = [i for i in hard if i >= self.batch_size]
            # The hard seeds inside the batch are rows already; those outside get their own teacher run.
            noise, labels = seeded_noise([seeds[i] for i in outside], module.loaded.image_shape, label_dim, module.dtype_)
            noise, labels = noise.to(module.device), None if labels is None else labels.to(module.device)
            teacher, indices = self.teacher(module)
            if not outside:
                final = noise.clone()
            elif module.placement:  # the placement teacher's last state is the student's last target
                final = teacher.sample(module.denoiser, noise, class_labels=labels)
            else:
                final = teacher_targets(teacher, indices[-1:], module.denoiser, noise, labels)[0]
        self.teacher_seconds += time.perf_counter() - start
        self._check_finite(teacher, final)
        hard_weight, easy_weight = stratified_weights(pool, count, self.batch_size - (count - len(outside)))
        in_batch = torch.zeros(self.batch_size, dtype=torch.bool)
        in_batch[[i for i in hard if i < self.batch_size]] = True
        weights = torch.cat([torch.where(in_batch, hard_weight, easy_weight), torch.full((len(outside),), hard_weight)]).to(torch.float64)
        self.hard = {
            "pool": pool,
            "seeds": [seeds[i] for i in hard],
            "screen_evaluations": (module.network_nfe() + reference.nfe) * pool,
            "teacher_evaluations": teacher.nfe * len(outside),
            "weights": [hard_weight, easy_weight],
        }
        return HardSeeds([seeds[i] for i in outside], noise.to(module.device), labels, final.to(module.device), weights)

    def _check_seed_settings(self, module: DODECalibration) -> None:
        """`dp_seeds`, `joint_pool` and `first_step` settings this data can serve (checked before the teacher runs)."""
        if module.hparams.first_step == "mean" and self._conditional(module):
            raise ConfigError("first_step mean needs an unconditional model (x̂₀ at σ_max is each class's mean); set data.class_conditional false or --model.first_step network")
        dp_seeds = module.hparams.dp_seeds
        if module.placement and dp_seeds and not self.batch_size <= dp_seeds <= SEED_LIMIT - self.seed:
            raise ConfigError(
                f"dp_seeds counts the seeds the placement measures from data.seed, the batch's {self.batch_size} included: use 0 (the batch only) "
                f"or at least data.batch_size (and stay within 32-bit seeds); got dp_seeds {dp_seeds}"
            )
        pool, count = module.hparams.joint_pool, module.hparams.joint_hard
        if not pool:
            return
        if self._rank_and_world()[1] > 1:
            raise ConfigError("joint_pool screens seeds on one process; set --model.joint_pool 0 or --trainer.devices 1")
        if self.noise != "per_seed":
            raise ConfigError("joint_pool draws the pool seed by seed; set data.noise per_seed or --model.joint_pool 0")
        if not self.batch_size < pool <= SEED_LIMIT - self.seed or count >= self.batch_size:
            raise ConfigError(
                f"joint_pool counts the seeds screened from data.seed, the batch's {self.batch_size} included: it must exceed data.batch_size "
                f"(and stay within 32-bit seeds), and joint_hard must stay below data.batch_size; got joint_pool {pool}, joint_hard {count}"
            )

    @staticmethod
    def _reference_steps(module: DODECalibration) -> int:
        """Steps of the hard-seed screening reference placed on the teacher's trajectory (`teacher_dp`)."""
        return min(HARD_REFERENCE_STEPS * (len(module.student.sigmas) - 1), module.hparams.dp_steps)

    def trajectory(self, module: DODECalibration, hard: "HardSeeds | None" = None) -> TeacherPath:
        """Every finished state of the teacher on the module's grid refined C times (`joint_intermediate`: targets at
        wherever the joint fit moves the steps) for the batch, then the hard seeds outside it (rows as the joint
        fit's); one more teacher run, memory O(C·NFE·|B|·D)."""
        noise, labels, _ = self.data.tensors
        noise, labels = noise.to(module.device), labels.to(module.device) if labels.shape[-1] else None
        if hard is not None:
            noise = torch.cat([noise, hard.noise.to(noise)])
            labels = None if labels is None else torch.cat([labels, hard.labels.to(labels)])
        teacher, _ = build_teacher(module.student, module.setup_spec, self.scale, "aligned", self.teacher_for(module), module.layout.history)
        slots = teacher.state_slots()
        sigmas = sorted(slots, reverse=True)
        start = time.perf_counter()
        with torch.no_grad():
            states = teacher_targets(teacher, [slots[s] for s in sigmas], module.denoiser, noise, labels)
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_nfe += teacher.nfe
        if hard is not None and self.hard is not None:
            self.hard["teacher_evaluations"] += teacher.nfe * len(hard.noise)
        return TeacherPath(torch.tensor(sigmas, dtype=torch.float64), states)

    def retarget(self, module: DODECalibration) -> None:
        """Aligned targets for the module's student after its steps moved (joint fit): one more teacher run, not cached."""
        noise, labels, _ = self.data.tensors
        teacher, indices = build_teacher(module.student, module.setup_spec, self.scale, "aligned", self.teacher_for(module), module.layout.history)
        start = time.perf_counter()
        with torch.no_grad():
            targets = teacher_targets(teacher, indices, module.denoiser, noise.to(module.device), labels.to(module.device) if labels.shape[-1] else None).cpu()
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_nfe += teacher.nfe
        self.data = TensorDataset(noise, labels, targets.transpose(0, 1).contiguous())

    @staticmethod
    def _check_finite(teacher: Solver, states: Tensor) -> None:
        if not states.isfinite().all():
            raise ConfigError(f"the teacher ({teacher.name}, NFE {teacher.nfe}) produced non-finite states: the denoiser or the grid gives NaN/inf; nothing was cached")

    def full_batch(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None, Tensor]:
        """The rank's whole calibration set: noise (B, …), labels or None, targets (K, B, …)."""
        noise, labels, targets = self.data.tensors
        return noise.to(device), (labels.to(device) if labels.shape[-1] else None), targets.transpose(0, 1).to(device)

    def train_dataloader(self) -> DataLoader:
        module: DODECalibration = self.trainer.lightning_module
        if module.fit_method in ("closed_form", "joint"):
            return DataLoader(self.data, batch_size=len(self.data), shuffle=False)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.data, batch_size=min(self.adam_batch_size, len(self.data)), shuffle=True, generator=generator, drop_last=True)

    def _cache_key(self, module: DODECalibration, teacher: Solver, seeds: list[int], label_dim: int) -> str:
        identity = {
            "version": CACHE_VERSION,
            **module.metadata(),
            "teacher": teacher.name,
            "teacher_sigmas": hashlib.sha256(teacher.sigmas.numpy().tobytes()).hexdigest(),
            "scale": self.scale,
            "target_mode": self.target_mode,
            "seeds": seeds,
            # global_stream: a sample depends on the whole batch's size (CPU randn fills in blocks), not only its seed
            "noise": [self.noise, self.batch_size],
            "label_dim": label_dim,
            "placement": module.placement_settings(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / f"targets-{key[:24]}.pt"

    def _check_cache_writable(self, key: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        if path.exists() and not path.is_file():
            raise ConfigError(f"teacher cache {path} is not a file; move it away or set data.cache_dir to another folder")
        reason = writable_folder_error(path.parent)
        if reason is not None:
            raise ConfigError(f"teacher cache folder {path.parent} is not writable ({reason}); set data.cache_dir to a writable folder, or null for no cache")

    def _load_cache(self, key: str, shapes: dict[str, tuple[int, ...] | None], dtype: torch.dtype) -> tuple[Tensor | None, ...] | None:
        """The cached (noise, labels, targets, sigmas, reference_sigmas) if the file holds exactly what this run needs (the placed σ,
        float64, with `teacher_dp`; else None); None (rebuild) otherwise."""
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(blob, dict) or blob.get("key") != key:
                raise ValueError("key mismatch")
            for name, shape in shapes.items():
                value = blob.get(name)
                if shape is None and value is None:
                    continue
                wanted = torch.float64 if name.endswith("sigmas") else dtype
                if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != wanted:
                    found = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{name} is {found}, expected {shape} {wanted}")
                if name.endswith("sigmas"):
                    check_sigmas(value)  # σ_0 may be ∞ (flow matching)
                elif not value.isfinite().all():
                    raise ValueError(f"{name} holds NaN or inf")
            return tuple(blob.get(name) for name in ("noise", "labels", "targets", "sigmas", "reference_sigmas"))
        except Exception as err:  # any unreadable or inconsistent cache is rebuilt, never trusted
            reason = (str(err).splitlines() or [""])[0][:120]
            warnings.warn(f"teacher-target cache {path} is unreadable or inconsistent ({type(err).__name__}: {reason}); rebuilding it")
            return None

    def _save_cache(
        self, key: str, noise: Tensor, labels: Tensor | None, targets: Tensor, sigmas: Tensor | None = None, reference_sigmas: Tensor | None = None
    ) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        with atomic_path(path) as tmp:
            torch.save({"key": key, "noise": noise, "labels": labels, "targets": targets, "sigmas": sigmas, "reference_sigmas": reference_sigmas}, tmp)
