"""Solver specifications: a grid plus a stage generator, with NFE and λ bookkeeping, built by name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import Tensor

from ..denoisers import Denoiser
from ..grids import check_sigmas, make_sigmas
from ..schedules import EDM, Schedule
from .stages import LambdaRule, Stage, StageGenerator, run_stages

__all__ = ["Solver", "OneStagePerStep", "SOLVERS", "register_solver", "make_solver", "solver_on", "NFEError"]


class NFEError(ValueError):
    """An NFE the solver cannot realise; the message names the valid values."""


class Solver(ABC):
    """A solver on fixed noise levels: `stages()` yields one `Stage` per network evaluation.

    `sigmas` are the step boundaries (descending, usually ending at 0); `scales` the state scales α = s(σ) at them
    (all ones for VE/EDM-form integration); `noise_scales` the noise scales β = s·σ (default: that product; a
    schedule gives them where σ = ∞, s = 0, β = 1). All are float64 tensors and may require grad: every
    coefficient is a torch expression of them. The initial state is `unit_prior ? z : β_0·z`.
    """

    name: ClassVar[str]
    prediction: ClassVar[str]

    def __init__(
        self, sigmas: Tensor, scales: Tensor | None = None, unit_prior: bool = False, noise_scales: Tensor | None = None
    ) -> None:
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.scales = torch.ones_like(self.sigmas) if scales is None else torch.as_tensor(scales, dtype=torch.float64)
        self.noise_scales = self.scales * self.sigmas if noise_scales is None else torch.as_tensor(noise_scales, dtype=torch.float64)
        self.unit_prior = unit_prior

    @classmethod
    def from_grid(cls, sigmas: Tensor, schedule: Schedule) -> "Solver":
        """Integrate the schedule's own scaled states (VP: s = 1/√(1+σ²), unit-noise prior)."""
        return cls(sigmas, schedule.scale(sigmas), unit_prior=schedule.variance_preserving, noise_scales=schedule.noise_scale(sigmas))

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """Grid name and `make_sigmas` keywords `make_solver` uses when no grid is named.

        Default: `uniform_torch` on discrete VP schedules, Karras ρ = 7 (+ σ = 0) otherwise.
        """
        return ("uniform_torch" if hasattr(schedule, "num_timesteps") else "karras"), {}

    @classmethod
    def grid_for(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """The grid used when none is named: the schedule's own (flow matching: the pipelines' shifted time grid
        from t = 1), else this solver's `default_grid`."""
        if schedule.own_grid is not None:
            return schedule.own_grid, {}
        return cls.default_grid(schedule)

    @classmethod
    @abstractmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        """Number of grid points (before any terminal 0) that gives this NFE; raises NFEError if none does."""

    @property
    @abstractmethod
    def nfe(self) -> int:
        """Network evaluations per run."""

    @property
    @abstractmethod
    def target_sigmas(self) -> Tensor:
        """Noise level of the state produced by each stage (one entry per stage, float64)."""

    @property
    @abstractmethod
    def lambda_fitted(self) -> list[bool]:
        """Per stage: whether λ_k is a free parameter (False where Δ_k is structurally absent)."""

    @abstractmethod
    def stages(self, x: Tensor) -> StageGenerator:
        """The solver's generator of `Evaluate`s and `Stage`s from state x at sigmas[0]."""

    @classmethod
    def teacher(
        cls, sigmas: Tensor, scales: Tensor | None, unit_prior: bool, segments: list[int], noise_scales: Tensor | None = None
    ) -> "Solver":
        """This solver as a teacher on `sigmas` whose state must be complete after each of `segments` (interval
        counts between the student's knots). Default: the plain solver (every grid point ends a step)."""
        return cls(sigmas, scales, unit_prior=unit_prior, noise_scales=noise_scales)

    @property
    def from_infinity(self) -> bool:
        """Whether the grid starts at σ = ∞ (flow matching's t = 1), where x_T = β_0·n carries no x₀ and no
        previous output exists: the noise side's d̂_{−1} := x_T gives no Δ_0 there (λ_0 ≡ 0)."""
        return bool(torch.isinf(self.sigmas[0]))

    @property
    def num_stages(self) -> int:
        return len(self.target_sigmas)

    @property
    def step_ends(self) -> list[bool]:
        """Per stage: whether its output is a finished solver state at target_sigmas[k] (not a predictor or an
        inner node of a multi-evaluation step). Only those states may serve as teacher targets."""
        return [True] * self.num_stages

    def state_slots(self) -> dict[float, int]:
        """σ → index j into the run's states xs (xs[0] = initial, xs[k + 1] = output of stage k) of the finished
        state at σ: where a teacher's targets are read."""
        slots = {float(self.sigmas[0].detach()): 0}
        for k, (sigma, end) in enumerate(zip(self.target_sigmas, self.step_ends)):
            if end:
                slots[float(sigma.detach())] = k + 1
        return slots

    def init_state(self, noise: Tensor) -> Tensor:
        if self.unit_prior:
            return noise.clone()
        return noise * self.noise_scales[0]

    def sample(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        lambdas: Tensor | None = None,
        class_labels: Tensor | None = None,
        observe: Callable[[int, Stage, Tensor], None] | None = None,
    ) -> Tensor:
        """Run from unit noise; `lambdas=None` is the base solver, otherwise the D-solver with these λ.

        `lambdas`: (K,) one λ per stage, or (K, m, …) as `LambdaLayout.expand` gives (m directions, entries
        broadcast against the state).
        """
        rule: LambdaRule | None = None
        if lambdas is not None:
            if len(lambdas) != self.num_stages:
                raise ValueError(f"{self.name} with NFE {self.nfe} has {self.num_stages} stages, got {len(lambdas)} λ")
            rule = lambda k, _stage: lambdas[k]  # noqa: E731
        history = lambdas.shape[1] if lambdas is not None and lambdas.dim() > 1 else 1
        return run_stages(self.stages(self.init_state(noise)), denoiser, rule, observe, history, class_labels=class_labels)


class OneStagePerStep(Solver):
    """Solvers with one network evaluation per grid interval: stage k takes σ_k → σ_{k+1}, NFE = steps.

    `min_nfe` is the smallest NFE the solver's order allows; `first_lambda_fitted` is False where stage 0 has no
    previous output (λ_0 ≡ 0, data-prediction solvers) and True where the official code uses d̂_{−1} := x_T.
    """

    min_nfe: ClassVar[int] = 1
    first_lambda_fitted: ClassVar[bool]

    def __init__(
        self, sigmas: Tensor, scales: Tensor | None = None, unit_prior: bool = False, noise_scales: Tensor | None = None
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        self.steps_for_nfe(len(self.sigmas) - 1)

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        if nfe < cls.min_nfe:
            raise NFEError(f"{cls.name} needs NFE ≥ {cls.min_nfe}, got {nfe}")
        return nfe

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    @property
    def target_sigmas(self) -> Tensor:
        return self.sigmas[1:]

    @property
    def lambda_fitted(self) -> list[bool]:
        return [(self.first_lambda_fitted and not self.from_infinity) or k > 0 for k in range(self.nfe)]


SOLVERS: dict[str, type[Solver]] = {}


def register_solver(cls: type[Solver]) -> type[Solver]:
    SOLVERS[cls.name] = cls
    return cls


def make_solver(
    name: str,
    nfe: int,
    schedule: Schedule | None = None,
    grid: str | None = None,
    sigmas: Tensor | None = None,
    **grid_kwargs: float,
) -> Solver:
    """Build a solver by name for a given NFE on a grid of the schedule, or on given step boundaries `sigmas`.

    Defaults: the EDM schedule and the solver's `grid_for` the schedule (whose keywords apply only to that default grid;
    explicit `grid_kwargs` win). `sigmas` (descending, e.g. a λ file's fitted grid) replaces the grid; it must
    give this NFE.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    cls = SOLVERS[name]
    schedule = EDM() if schedule is None else schedule
    if sigmas is not None:
        return solver_on(cls, check_sigmas(sigmas), schedule, nfe)
    if grid is None:
        grid, defaults = cls.grid_for(schedule)
        grid_kwargs = {**defaults, **grid_kwargs}
    sigmas = make_sigmas(grid, cls.steps_for_nfe(nfe), schedule, **grid_kwargs)
    return cls.from_grid(sigmas, schedule)


def solver_on(cls: type[Solver], sigmas: Tensor, schedule: Schedule, nfe: int | None = None) -> Solver:
    """Solver `cls` on the given step boundaries; with `nfe`, refuse boundaries that give another NFE."""
    solver = cls.from_grid(sigmas, schedule)
    if nfe is not None and solver.nfe != nfe:
        raise NFEError(f"{cls.name} on these {len(sigmas)} σ takes NFE {solver.nfe}, not {nfe}")
    return solver
