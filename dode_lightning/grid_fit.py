"""Fitted step positions (issue 12 item 3c, as GITS/LD3 do): the interior σ of a student grid chosen to bring the
student's final state closest to an accurate teacher's endpoint on the calibration batch.

Plain tensor code, no Lightning. The grid is parametrised monotonically in the Karras coordinate u = σ^{1/ρ}: the
distance from u(σ_max) to u(σ_end) is split into increments softmax(θ), so every θ gives a descending grid with
the same endpoints (and the same terminal σ = 0, if the grid has one). θ = 0 is the Karras grid of that ρ. The
fit is derivative-free (Nelder–Mead on θ, a bounded number of student runs); the closed-form λ fit then runs on
the fitted grid like on any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from .denoisers import Denoiser
from .distill import SolverSetup, build_teacher, fit_closed_form, teacher_targets
from .schedules import Schedule
from .solvers import SOLVERS, LambdaLayout, Solver

__all__ = ["GridFit", "grid_from_params", "params_from_grid", "teacher_endpoint", "distilled_final_state", "fit_grid"]

# Nelder–Mead's first simplex: each vertex moves one log-increment by this much (the default 5 % of a zero θ
# would be 0.00025, too small to leave the Karras grid's basin of rounding noise).
SIMPLEX_STEP = 0.5


@dataclass
class GridFit:
    """The fitted σ list and the calibration objective (mean squared error of the final state) before and after."""

    sigmas: Tensor
    loss_initial: float
    loss_fit: float
    evaluations: int


def _positive_span(sigmas: Tensor) -> int:
    """Index of the last positive σ: the free points are strictly between 0 and it; a terminal 0 stays fixed."""
    return len(sigmas) - 2 if float(sigmas[-1]) == 0.0 else len(sigmas) - 1


def params_from_grid(sigmas: Tensor, rho: float = 7.0) -> Tensor:
    """θ (one per free interior point) that reproduces `sigmas`: log-increments in u = σ^{1/ρ}, the first fixed at 0."""
    last = _positive_span(sigmas)
    u = sigmas[: last + 1].to(torch.float64) ** (1 / rho)
    increments = u[:-1] - u[1:]
    if not bool((increments > 0).all()):
        raise ValueError("the grid's σ must be strictly descending down to its last positive value")
    logs = torch.log(increments)
    return logs[1:] - logs[0]


def grid_from_params(theta: Tensor, sigmas: Tensor, rho: float = 7.0) -> Tensor:
    """The grid with the endpoints of `sigmas` and interior points placed by θ (see the module docstring)."""
    last = _positive_span(sigmas)
    u_max, u_end = float(sigmas[0]) ** (1 / rho), float(sigmas[last]) ** (1 / rho)
    weights = torch.softmax(torch.cat([theta.new_zeros(1), theta.to(torch.float64)]), dim=0)
    u = u_max - (u_max - u_end) * torch.cumsum(weights, dim=0)
    fitted = torch.cat([sigmas[:1].to(torch.float64), u[:-1] ** rho, sigmas[last : last + 1].to(torch.float64)])
    return torch.cat([fitted, sigmas[last + 1 :].to(torch.float64)])


def teacher_endpoint(
    student: Solver, setup: SolverSetup, denoiser: Denoiser, noise: Tensor, scale: int, teacher: str = "unipc_3", class_labels: Tensor | None = None
) -> Tensor:
    """The teacher's final state at the student's end σ (C× the student's steps, `aligned` grid), computed once:
    every grid with the same endpoints is fitted against it."""
    solver, indices = build_teacher(student, setup, scale, "aligned", teacher)
    return teacher_targets(solver, indices[-1:], denoiser, noise, class_labels)[0]


def distilled_final_state(
    setup: SolverSetup, denoiser: Denoiser, noise: Tensor, scale: int, teacher: str = "unipc_3", history: int = 0
) -> Callable[[Solver], Tensor]:
    """For `fit_grid(final_state=...)`: the D-solver's final state on `noise`, its λ fitted in closed form on each
    trial grid (`aligned` targets from `teacher` at C = `scale`; `history` 0 = all earlier outputs)."""

    def run(student: Solver) -> Tensor:
        solver, indices = build_teacher(student, setup, scale, "aligned", teacher)
        layout = LambdaLayout(history or student.num_stages)
        fit = fit_closed_form(student, denoiser, noise, teacher_targets(solver, indices, denoiser, noise), layout=layout)
        return student.sample(denoiser, noise, layout.expand(fit.lambdas, noise.shape[1:]))

    return run


def fit_grid(
    name: str,
    sigmas: Tensor,
    schedule: Schedule,
    denoiser: Denoiser,
    noise: Tensor,
    endpoint: Tensor,
    class_labels: Tensor | None = None,
    rho: float = 7.0,
    max_evaluations: int | None = None,
    final_state: Callable[[Solver], Tensor] | None = None,
) -> GridFit:
    """Fit the interior σ of solver `name`'s grid `sigmas` to minimise ‖student(noise) − endpoint‖² / n.

    Starts from `sigmas` (θ from `params_from_grid`); `max_evaluations` student runs at most (default 60 per free
    point). `final_state` produces the student's final state on `noise` (default: the base solver; a D-solver
    whose λ are fitted on each trial grid makes the fit joint). Returns the initial grid unchanged where it has no
    free point or the fit does not lower the loss.
    """
    cls = SOLVERS[name]
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    reference = endpoint.to(torch.float64)
    run = final_state or (lambda student: student.sample(denoiser, noise, class_labels=class_labels))

    def loss(theta: np.ndarray) -> float:
        grid = grid_from_params(torch.from_numpy(theta), sigmas, rho)
        out = run(cls.from_grid(grid, schedule))
        return float(((out.to(torch.float64) - reference) ** 2).mean())

    start = params_from_grid(sigmas, rho).numpy()
    initial = loss(start)
    if start.size == 0:
        return GridFit(sigmas, initial, initial, 1)
    budget = max_evaluations or 60 * start.size
    simplex = np.vstack([start, start + SIMPLEX_STEP * np.eye(start.size)])
    result = minimize(loss, start, method="Nelder-Mead", options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 0.0})
    if not result.fun < initial:
        return GridFit(sigmas, initial, initial, int(result.nfev) + 1)
    return GridFit(grid_from_params(torch.from_numpy(result.x), sigmas, rho), initial, float(result.fun), int(result.nfev) + 1)
