"""Step positions placed on the teacher's trajectory (GITS-like: Chen et al., ICML 2024, from the paper's description).

Plain tensor code, no Lightning. The teacher runs once on a fine grid σ_0 > … > σ_M over the calibration batch; its
evaluations (x̂₀ and ε̂ at each state x_i) and its states x_j give, without another network call, the error of one
first-order step from every grid point i to every later point j:

    c_ij = mean over the batch of ‖α_j·x̂₀(x_i) + β_j·ε̂(x_i) − x_j‖₂          (α = s, β = s·σ: DDIM = Euler in VE form)

i.e. GITS's l2 cost. We use this rather than the student solver's own one-step update because a multistep
student's step from i to j depends on the knots before i as well, which a pairwise cost cannot express, and
because the first-order error comes free from the teacher's evaluations (the student's own step would cost one
network call per pair). Dynamic programming then picks the N steps from point 0 to point M that minimise
Σ_n c^n·c_{k_n k_{n+1}} (c ≥ 1 weighs the later, low-noise steps more; c = 1 is the plain sum). The chosen knots
are teacher states, so the λ fit's aligned targets are read from the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .denoisers import Denoiser
from .distill import SolverSetup, teacher_on
from .grids import make_sigmas
from .solvers import Evaluate, Solver, Stage, StageGenerator, run_stages

__all__ = ["PLACEMENT_TEACHER", "Trajectory", "placement_teacher", "teacher_trajectory", "one_step_costs", "place_knots", "placed_sigmas", "states_at"]

# GITS's teacher: iPNDM evaluates once per step at its own state, so every grid point has x̂₀ and ε̂ for free.
PLACEMENT_TEACHER = "ipndm"

# Pools per-pair sums across processes (identity on one process).
Reduce = Callable[[Tensor], Tensor]


@dataclass
class Trajectory:
    """One teacher run on a fine grid: its σ, every finished state, and x̂₀, ε̂ at each evaluated state."""

    sigmas: Tensor
    """σ_0 … σ_M (descending)."""
    scales: Tensor
    """α_j = s(σ_j)."""
    noise_scales: Tensor
    """β_j = s(σ_j)·σ_j (1 at flow matching's σ = ∞)."""
    states: Tensor
    """(M + 1, B, …) the teacher's state x_j at σ_j (x_0 the initial state)."""
    denoised: Tensor
    """(M, B, …) x̂₀ evaluated at x_i."""
    eps: Tensor
    """(M, B, …) ε̂ at x_i."""

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample of the run."""
        return len(self.denoised)


def placement_teacher(student: Solver, setup: SolverSetup, steps: int, name: str | None = None) -> Solver:
    """The teacher on the fine grid: `steps` steps of `setup`'s grid kind and settings (same ends as the student)."""
    fine = make_sigmas(setup.grid, steps, setup.schedule, **setup.grid_kwargs)
    return _check_teacher(teacher_on(name or PLACEMENT_TEACHER, fine, student, setup.schedule, [1] * (len(fine) - 1)))


def _check_teacher(teacher: Solver) -> Solver:
    if not teacher.nfe == teacher.num_stages == len(teacher.sigmas) - 1 or not all(teacher.step_ends):
        raise ValueError(f"the placement teacher must evaluate once per step at its own state (ipndm, euler, ddim, deis_*, dpm_solver_pp_*), not {teacher.name}")
    return teacher


def _recording(stages: StageGenerator, log: list[tuple[Evaluate, object]]) -> StageGenerator:
    """The same stage generator, logging every evaluation request with the answer it got."""
    message = next(stages)
    while True:
        reply = yield message
        if isinstance(message, Evaluate):
            log.append((message, reply))
        try:
            message = stages.send(reply)
        except StopIteration as stop:
            return stop.value


def teacher_trajectory(
    teacher: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    class_labels: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Trajectory:
    """Run `teacher` (one evaluation per step, at the step's own state: Euler/DDIM, iPNDM, DEIS, DPM-Solver++ M) once
    on `noise` and keep its whole trajectory. Memory O(3·M·B·D)."""
    _check_teacher(teacher)
    states = noise.new_empty((len(teacher.sigmas), *noise.shape))
    states[0] = teacher.init_state(noise)
    log: list[tuple[Evaluate, object]] = []

    def keep(k: int, stage: Stage, state: Tensor) -> None:
        states[k + 1] = state
        if progress is not None:
            progress(k)

    with torch.no_grad():
        run_stages(_recording(teacher.stages(states[0].clone()), log), denoiser, observe=keep, class_labels=class_labels)
    alpha, beta = teacher.scales, teacher.noise_scales
    denoised, eps = noise.new_empty((teacher.nfe, *noise.shape)), noise.new_empty((teacher.nfe, *noise.shape))
    for i, (request, reply) in enumerate(log):
        if not torch.equal(request.sigma.detach(), teacher.sigmas[i].detach()):
            raise ValueError(f"{teacher.name} evaluates off its grid (evaluation {i} at σ = {float(request.sigma):.4g}); choose another placement teacher")
        if isinstance(reply, tuple):
            eps[i], denoised[i] = reply
        else:
            denoised[i] = reply
            eps[i] = (request.x - float(alpha[i]) * reply) / float(beta[i])  # x = α·x̂₀ + β·ε̂
    return Trajectory(teacher.sigmas.detach(), alpha.detach(), beta.detach(), states, denoised, eps)


def one_step_costs(trajectories: Trajectory | Iterable[Trajectory], reduce: Reduce | None = None) -> Tensor:
    """c_ij (module docstring) as an (M + 1, M + 1) float64 matrix, +∞ where j ≤ i: the mean over the rows of one
    run, or of several runs of the same teacher (e.g. one batch of seeds each), pooled by `reduce`."""
    runs = [trajectories] if isinstance(trajectories, Trajectory) else trajectories
    sums, count = None, 0
    for trajectory in runs:
        run_sums = _error_sums(trajectory)
        sums = run_sums if sums is None else sums + run_sums
        count += trajectory.states.shape[1]
    if sums is None:
        raise ValueError("one_step_costs needs at least one teacher run")
    points = len(sums)
    pooled = torch.cat([sums.flatten(), torch.tensor([float(count)], dtype=torch.float64)])
    if reduce is not None:
        pooled = reduce(pooled)
    costs = (pooled[:-1] / pooled[-1]).reshape(points, points)
    upper = torch.ones(points, points, dtype=torch.bool).triu(1)
    return torch.where(upper, costs, torch.full_like(costs, float("inf")))


def _error_sums(trajectory: Trajectory) -> Tensor:
    """Σ over the run's rows of ‖α_j·x̂₀(x_i) + β_j·ε̂(x_i) − x_j‖₂ for every pair i < j (0 elsewhere)."""
    points = len(trajectory.sigmas)
    sums = torch.zeros(points, points, dtype=torch.float64)
    alpha, beta = trajectory.scales, trajectory.noise_scales
    shape = (-1,) + (1,) * (trajectory.states.dim() - 1)
    for i in range(points - 1):
        later = slice(i + 1, points)
        step = alpha[later].reshape(shape).to(trajectory.states.dtype) * trajectory.denoised[i] + beta[later].reshape(shape).to(trajectory.states.dtype) * trajectory.eps[i]
        error = (step - trajectory.states[later]).flatten(2).to(torch.float64).norm(dim=2)
        sums[i, later] = error.sum(1).cpu()
    return sums


def place_knots(costs: Tensor, steps: int, coefficient: float = 1.0) -> list[int]:
    """Indices 0 = k_0 < k_1 < … < k_steps = M minimising Σ_n coefficient^n · costs[k_n, k_{n+1}] (exact DP, O(steps·M²))."""
    points = len(costs)
    if not 1 <= steps <= points - 1:
        raise ValueError(f"cannot place {steps} steps on a teacher grid of {points - 1} steps; use more placement steps (dp_steps)")
    if coefficient <= 0:
        raise ValueError(f"the placement coefficient must be > 0 (GITS: about 1), got {coefficient}")
    best = torch.full((points,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(steps + 1, points, dtype=torch.long)
    for n in range(1, steps + 1):
        # total[i, j]: the best n − 1 steps to point i, then the step i → j.
        total = best[:, None] + coefficient ** (n - 1) * costs.to(torch.float64)
        best, choice[n] = total.min(dim=0)
    knots = [points - 1]
    for n in range(steps, 0, -1):
        knots.append(int(choice[n, knots[-1]]))
    if knots[-1] != 0 or not torch.isfinite(best[-1]):
        raise ValueError("no finite placement: the teacher's one-step costs are not finite (NaN/inf in the teacher run)")
    return knots[::-1]


def placed_sigmas(trajectory: Trajectory, steps: int, coefficient: float = 1.0, reduce: Reduce | None = None) -> Tensor:
    """The σ of `steps` steps placed on the trajectory's grid by `place_knots` over its pooled `one_step_costs`."""
    return trajectory.sigmas[place_knots(one_step_costs(trajectory, reduce), steps, coefficient)]


def states_at(trajectory: Trajectory, sigmas: Tensor) -> Tensor:
    """The teacher's states at the given σ (each one of the trajectory's grid points): (K, B, …)."""
    index = {float(s): j for j, s in enumerate(trajectory.sigmas)}
    missing = [f"{float(s):.4g}" for s in sigmas if float(s) not in index]
    if missing:
        raise ValueError(f"σ = {', '.join(missing)} are not points of the teacher's grid")
    return trajectory.states[[index[float(s)] for s in sigmas]]
