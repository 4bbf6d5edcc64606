"""End-to-end joint fit of step positions and λ (issue 18 item 3): plain tensor code, no Lightning.

The student's final state is a differentiable function of its step boundaries σ and its λ (every solver's
coefficients are torch expressions of σ; `run_stages(..., detach=False)` keeps the graph through all stages), so
both are fitted together by backpropagating the error to the teacher's final state:

    L(σ, λ) = ‖x_N(z; σ, λ) − x*_N(z)‖² / n  [+ w · Σ_k ‖x_k − x*(σ_k)‖² / n]

with x*(σ_k) read off the teacher's trajectory at the student's current σ_k (interpolated in log σ), and optionally
LD3's soft teacher forcing: the student may start from z + ξ, ‖ξ‖ ≤ r per sample (Tong et al., ICLR 2025).

Step positions are monotone by construction: in a coordinate u (log σ, or the Karras u = σ^{1/ρ}) the distance from
u(σ_0) to u(σ_end) is split into shares softmax(θ); σ_0, σ_end (and a terminal σ = 0) never move. λ are fitted in
units of each stage's natural scale c_k (`StageFit.natural_scales`), λ = c·φ, so every parameter is O(1).

The fit starts from given σ and λ (the closed form on a DP or standard grid) and never ends worse than that start:
the iterate it returns is the best one on the held-out rows (or, without them, on the training rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .denoisers import Denoiser
from .schedules import Schedule, flow_time
from .solvers import SOLVERS, LambdaLayout, Solver, Stage, run_stages

__all__ = [
    "COORDINATES",
    "JointSettings",
    "JointFit",
    "JointResult",
    "JointFitDiverged",
    "TeacherPath",
    "step_params",
    "grid_from_params",
    "student_states",
    "hard_rows",
    "stratified_weights",
]

Coordinate = Literal["log", "karras", "flow"]
COORDINATES = ("log", "karras", "flow")
# Pools a per-rank sum across processes (identity on one process).
Reduce = Callable[[Tensor], Tensor]
# A share of the σ span below this is a collapsed step (two boundaries at the same noise level).
COLLAPSED_SHARE = 1e-9
# Most loss evaluations one L-BFGS line search may spend.
LINE_SEARCH = 20


class JointFitDiverged(RuntimeError):
    """The joint fit met a non-finite loss or collapsing steps; the message names the iteration and the stage."""


def _forward(coordinate: Coordinate, rho: float) -> Callable[[Tensor], Tensor]:
    if coordinate == "flow":  # flow time t = σ/(1 + σ): 1 at σ = ∞ (flow matching's start), 0 at σ = 0
        return flow_time
    return torch.log if coordinate == "log" else (lambda s: s ** (1 / rho))


def _inverse(coordinate: Coordinate, rho: float) -> Callable[[Tensor], Tensor]:
    if coordinate == "flow":
        return lambda u: u / (1 - u)
    return torch.exp if coordinate == "log" else (lambda u: u**rho)


def _free_span(sigmas: Tensor, coordinate: Coordinate) -> int:
    """Index of the fixed end: the last positive σ, or the terminal 0 where the coordinate reaches it (Karras and flow
    u(0) = 0, so the last positive σ moves too)."""
    positive = int((sigmas > 0).sum())
    if positive == len(sigmas) or coordinate == "log":
        return positive - 1
    return positive


def _check(sigmas: Tensor, coordinate: str) -> None:
    if coordinate not in COORDINATES:
        raise ValueError(f"unknown step coordinate {coordinate!r}; choose one of {', '.join(COORDINATES)}")
    if len(sigmas) < 2 or not bool((sigmas[:-1] > sigmas[1:]).all()) or float(sigmas[-1]) < 0:
        raise ValueError("the joint fit needs strictly decreasing σ ≥ 0")
    if not bool(sigmas[:1].isfinite().all()) and coordinate != "flow":
        raise ValueError("a grid from σ = ∞ (flow matching's t = 1) is spread in flow time: use joint_coordinate flow")


def step_params(sigmas: Tensor, coordinate: Coordinate = "log", rho: float = 7.0) -> Tensor:
    """θ (one per step between the fixed ends) that `grid_from_params` maps back to `sigmas`: log of each step's
    share of the span in u, centred (softmax ignores a common shift)."""
    _check(sigmas, coordinate)
    end = _free_span(sigmas, coordinate)
    u = _forward(coordinate, rho)(sigmas[: end + 1].detach().to(torch.float64))
    logs = torch.log(u[:-1] - u[1:])
    return logs - logs.mean()


def grid_from_params(theta: Tensor, sigmas: Tensor, coordinate: Coordinate = "log", rho: float = 7.0) -> Tensor:
    """The grid with the fixed ends of `sigmas` and the points between them placed by θ; differentiable in θ."""
    end = _free_span(sigmas, coordinate)
    ends = sigmas.detach().to(torch.float64)
    forward, inverse = _forward(coordinate, rho), _inverse(coordinate, rho)
    u_first, u_end = forward(ends[0]), forward(ends[end])
    u = u_first - (u_first - u_end) * torch.cumsum(torch.softmax(theta.to(torch.float64), dim=0), dim=0)[:-1]
    return torch.cat([ends[:1], inverse(u), ends[end:]])


@dataclass
class TeacherPath:
    """The teacher's finished states along its fine grid, to read targets at any σ between two of them."""

    sigmas: Tensor
    """(M + 1,) descending."""
    states: Tensor
    """(M + 1, B, …)."""

    def at(self, sigma: Tensor) -> Tensor:
        """The state at σ, linear in log σ between the two neighbouring teacher states (exact at a teacher σ), in
        flow time t = σ/(1 + σ) on a grid from σ = ∞; differentiable in σ."""
        if float(sigma.detach()) <= 0.0:
            return self.states[-1]
        positive = self.sigmas[self.sigmas > 0]
        j = int(torch.searchsorted(-positive, -sigma.detach(), right=False).clamp(1, len(positive) - 1))
        coordinate = flow_time if bool(torch.isinf(positive[0])) else torch.log
        upper, lower = coordinate(positive[j - 1]), coordinate(positive[j])
        w = (upper - coordinate(sigma)) / (upper - lower)
        return (1 - w) * self.states[j - 1] + w * self.states[j]


def student_states(
    solver: Solver,
    denoiser: Denoiser,
    x: Tensor,
    lambdas: Tensor | None,
    history: int,
    class_labels: Tensor | None = None,
    observe: Callable[[int, Stage, Tensor], None] | None = None,
) -> Tensor:
    """The student's final state from its initial state x, differentiable in σ, λ and x (the graph is kept through
    every stage). `lambdas`: as `LambdaLayout.expand` gives them, or None for the base solver."""
    rule = None if lambdas is None else (lambda k, _stage: lambdas[k])
    return run_stages(solver.stages(x), denoiser, rule, observe, history, class_labels=class_labels, detach=False)


@dataclass(frozen=True)
class JointSettings:
    """How the joint fit runs.

    optimizer: `lbfgs` (full batch, strong Wolfe line search; one iteration per `step`) or `adam`.
    lr: Adam's learning rate (L-BFGS: its initial step length, 1 is the quasi-Newton step).
    coordinate: where steps are spread: `log` (half log-SNR, LD3) or `karras` (u = σ^{1/ρ}; with a terminal 0 the
        last positive σ moves too).
    fit_lambdas: fit λ with σ (False: σ only, λ stay as given; with zero λ this is LD3's objective).
    intermediate: weight of the per-stage errors to the teacher trajectory (0: final state only).
    slack: LD3's soft teacher forcing, the radius r of the ball each training latent may move in (0: off).
    """

    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = 1.0
    coordinate: Coordinate = "log"
    rho: float = 7.0
    fit_lambdas: bool = True
    intermediate: float = 0.0
    slack: float = 0.0
    history_size: int = 20

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"unknown joint optimizer {self.optimizer!r}; choose lbfgs or adam")
        if self.coordinate not in COORDINATES:
            raise ValueError(f"unknown step coordinate {self.coordinate!r}; choose one of {', '.join(COORDINATES)}")
        if not (self.lr > 0 and self.intermediate >= 0 and self.slack >= 0 and self.rho > 0):
            raise ValueError(f"the joint fit needs lr > 0, intermediate ≥ 0, slack ≥ 0, rho > 0; got {self.lr}, {self.intermediate}, {self.slack}, {self.rho}")


@dataclass
class JointResult:
    """The fitted grid and λ (the best iterate), the losses before and after, and what the fit cost."""

    sigmas: Tensor
    lambdas: Tensor
    loss_start: float
    loss_end: float
    held_start: float | None
    held_end: float | None
    iterations: int
    best_iteration: int
    forward_runs: int
    """Student runs on the training rows without gradient plus held-out runs (in rows: `forward_rows`)."""
    backward_runs: int
    forward_rows: int
    backward_rows: int


class JointFit:
    """Parameters, objective and optimiser of one joint fit; `step()` is one iteration (DODECalibration's
    training_step, or `fit()` for plain scripts).

    `target`: the teacher's final state (B, …) at the grid's end; `path`: its trajectory, for `intermediate` > 0.
    `lambdas`: compact λ to start from (`layout.shape`); `lambda_scale`: c_k per stage (default 1).
    `held`: rows (bool per sample) left out of the fit and used to keep its best iterate (the never-worse guard).
    `weights`: a weight per row (default 1) of the final state's error, whose term is then a weighted mean, e.g.
    `stratified_weights` for a batch enriched with hard seeds. The per-stage errors (`intermediate`) are summed
    unweighted: every row's path counts alike (weighting them as well measured the same on 20,000 held-out seeds).
    `reduce` pools sums across processes: the loss and gradient are those of the union batch on every rank.
    """

    def __init__(
        self,
        name: str,
        sigmas: Tensor,
        schedule: Schedule,
        denoiser: Denoiser,
        noise: Tensor,
        target: Tensor,
        lambdas: Tensor,
        layout: LambdaLayout,
        settings: JointSettings = JointSettings(),
        class_labels: Tensor | None = None,
        lambda_scale: Tensor | None = None,
        held: Tensor | None = None,
        path: TeacherPath | None = None,
        reduce: Reduce | None = None,
        weights: Tensor | None = None,
    ) -> None:
        if name not in SOLVERS:
            raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
        if settings.intermediate and path is None:
            raise ValueError("intermediate targets need the teacher's trajectory (path)")
        self.cls, self.schedule, self.denoiser, self.layout, self.settings = SOLVERS[name], schedule, denoiser, layout, settings
        self.start_sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach()
        self.noise, self.target, self.class_labels, self.path = noise, target, class_labels, path
        self.reduce = reduce or (lambda t: t)
        self.held = torch.zeros(len(noise), dtype=torch.bool) if held is None else held.to(torch.bool)
        self.train = ~self.held
        self.has_held = bool(self.reduce(self.held.sum().to(torch.float64)) > 0)
        if weights is not None and (weights.shape != (len(noise),) or not bool((weights > 0).all()) or not bool(weights.isfinite().all())):
            raise ValueError("the joint fit's row weights must be one finite positive number per calibration sample")
        self.weights = torch.ones(len(noise), dtype=torch.float64) if weights is None else weights.detach().to(torch.float64)
        elements = noise[0].numel()
        self.count = {
            rows: float(self.reduce((self.weights[mask].sum() * elements).reshape(())))
            for rows, mask in (("train", self.train), ("held", self.held))
        }
        self.image_shape = tuple(noise.shape[1:])
        scale = torch.ones(len(lambdas), dtype=torch.float64) if lambda_scale is None else lambda_scale.to(torch.float64)
        self.lambda_scale = scale.reshape(-1, *[1] * (lambdas.dim() - 1))
        self.start_lambdas = lambdas.detach().to(torch.float64).clone()
        self.theta = step_params(self.start_sigmas, settings.coordinate, settings.rho).requires_grad_(True)
        self.phi = (self.start_lambdas / self.lambda_scale).requires_grad_(settings.fit_lambdas)
        params = [self.theta] + ([self.phi] if settings.fit_lambdas else [])
        self.shared = list(params)  # pooled across ranks; the slack is each rank's own
        self.xi = None
        if settings.slack:
            self.xi = torch.zeros_like(noise[self.train], dtype=torch.float64).requires_grad_(True)
            params.append(self.xi)
        if settings.optimizer == "lbfgs":
            self.optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
                # max_eval also caps the line search (torch ≥ 2.x): one iteration per step, up to LINE_SEARCH trials.
                params, lr=settings.lr, max_iter=1, max_eval=1 + LINE_SEARCH, history_size=settings.history_size,
                tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
            )
        else:
            self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        self.cache: list[tuple[Tensor, float, list[Tensor]]] = []
        self.iterations = 0
        self.forward_runs = self.backward_runs = self.forward_rows = self.backward_rows = 0
        with torch.no_grad():
            self.loss_start = self.evaluate("train")
            self.held_start = self.evaluate("held") if self.has_held else None
        if not math.isfinite(self.loss_start):
            raise self._diverged(self._first_bad_stage())
        self.loss_unit = self.loss_start if self.loss_start > 0 else 1.0
        self.best = (self._score(self.loss_start, self.held_start), 0, self.theta.detach().clone(), self.phi.detach().clone(), self.loss_start)
        self.last_loss = self.loss_start

    # ---- the objective ----

    def sigmas(self) -> Tensor:
        """The current grid (differentiable in θ)."""
        return grid_from_params(self.theta, self.start_sigmas, self.settings.coordinate, self.settings.rho)

    def lambdas(self) -> Tensor:
        """The current compact λ in paper units."""
        return self.phi * self.lambda_scale

    def _solver(self, sigmas: Tensor) -> Solver:
        return self.cls.from_grid(sigmas, self.schedule)

    def _loss_sum(self, rows: str, slack: bool) -> Tensor:
        """Σ squared error of the final state (+ weighted per-stage errors) over this rank's `rows`."""
        mask = self.train if rows == "train" else self.held
        if not bool(mask.any()):
            return torch.zeros((), dtype=torch.float64)
        sigmas = self.sigmas()
        solver = self._solver(sigmas)
        noise = self.noise[mask].to(torch.float64)
        if slack and self.xi is not None:
            # ξ = r·tanh(‖v‖)·v/‖v‖: inside the ball of radius r and smooth, so L-BFGS needs no projection.
            norm = self.xi.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (noise.dim() - 1))
            noise = noise + self.settings.slack * torch.tanh(norm) * self.xi / norm
        labels = None if self.class_labels is None else self.class_labels[mask]
        lambdas = self.layout.expand(self.lambdas(), self.image_shape)
        intermediate: list[Tensor] = []
        observe = None
        if self.settings.intermediate and self.path is not None:
            states = self.path.states[:, mask]
            path = TeacherPath(self.path.sigmas, states)

            def observe(k: int, stage: Stage, state: Tensor) -> None:
                if k < solver.num_stages - 1 and solver.step_ends[k]:
                    intermediate.append(((state - path.at(solver.target_sigmas[k])) ** 2).sum())

        final = student_states(solver, self.denoiser, solver.init_state(noise), lambdas, self.layout.history, labels, observe)
        per_row = ((final.to(torch.float64) - self.target[mask].to(torch.float64)) ** 2).flatten(1).sum(1)
        loss = (self.weights[mask].to(per_row.device) * per_row).sum()
        if intermediate:
            loss = loss + self.settings.intermediate * torch.stack(intermediate).sum()
        return loss

    def evaluate(self, rows: str = "train") -> float:
        """The pooled mean squared error of the current parameters on `rows` (`train` or `held`), without slack."""
        with torch.no_grad():
            local = self._loss_sum(rows, slack=False)
        self._count(rows, backward=False)
        return float(self.reduce(local.detach())) / max(self.count[rows], 1.0)

    def _count(self, rows: str, backward: bool) -> None:
        n = int((self.train if rows == "train" else self.held).sum())
        self.forward_runs += 1
        self.forward_rows += n
        if backward:
            self.backward_runs += 1
            self.backward_rows += n

    def _point(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.optimizer.param_groups[0]["params"]])

    def _cached(self, point: Tensor) -> tuple[float, list[Tensor]] | None:
        for cached, loss, grads in self.cache:
            if torch.equal(cached, point):
                return loss, grads
        return None

    def closure(self) -> Tensor:
        """Loss and gradient (pooled) at the current parameters; repeated points are answered from a cache (L-BFGS
        re-evaluates where its line search ended)."""
        point = self._point()
        hit = self._cached(point)
        if hit is not None:
            for p, g in zip(self.optimizer.param_groups[0]["params"], hit[1]):
                p.grad = g.clone()
            return torch.tensor(hit[0] / self.loss_unit, dtype=torch.float64)
        self.optimizer.zero_grad()
        # Relative to the start (1 there): L-BFGS keeps a curvature pair only if yᵀs > 1e-10, which the raw mean
        # squared errors (1e-3 … 1e-6) would rarely pass.
        local = self._loss_sum("train", slack=True) / (self.count["train"] * self.loss_unit)
        local.backward()
        self._count("train", backward=True)
        for p in self.shared:
            if p.grad is not None:
                p.grad = self.reduce(p.grad)
        loss = float(self.reduce(local.detach())) * self.loss_unit
        if not math.isfinite(loss):
            raise self._diverged(self._first_bad_stage())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.optimizer.param_groups[0]["params"]]
        self.cache = (self.cache + [(point, loss, grads)])[-8:]
        return torch.tensor(loss / self.loss_unit, dtype=torch.float64)

    # ---- iterations ----

    def _score(self, train: float, held: float | None) -> float:
        return train if held is None else held

    def step(self) -> float:
        """One optimiser iteration; returns the training loss. Raises JointFitDiverged on a non-finite loss or
        collapsing steps."""
        self.iterations += 1
        if self.settings.optimizer == "lbfgs":
            self.optimizer.step(self.closure)
        else:
            self.closure()
            self.optimizer.step()
        self._check_finite()
        hit = None if self.xi is not None else self._cached(self._point())
        loss = hit[0] if hit is not None else self.evaluate("train")
        if not math.isfinite(loss):
            raise self._diverged(self._first_bad_stage())
        held = self.evaluate("held") if self.has_held else None
        score = self._score(loss, held)
        if score < self.best[0]:
            self.best = (score, self.iterations, self.theta.detach().clone(), self.phi.detach().clone(), loss)
        self.last_loss = loss
        return loss

    def _diverged(self, what: str) -> JointFitDiverged:
        return JointFitDiverged(f"the joint fit diverged at iteration {self.iterations}: {what}; no λ file written")

    def _check_finite(self) -> None:
        shared = torch.cat([p.detach().flatten() for p in self.shared])
        if not bool(shared.isfinite().all()):
            raise self._diverged(f"non-finite step positions or λ (stage {self._bad_parameter_stage()})")
        shares = torch.softmax(self.theta.detach(), dim=0)
        if float(shares.min()) < COLLAPSED_SHARE:
            k = int(shares.argmin())
            sigmas = self.sigmas().detach()
            raise self._diverged(f"steps collapse at stage {k} (σ_{k} = {float(sigmas[k]):.6g} ≈ σ_{k + 1} = {float(sigmas[k + 1]):.6g})")

    def _bad_parameter_stage(self) -> int:
        bad_theta = (~self.theta.detach().isfinite()).nonzero()
        if len(bad_theta):
            return int(bad_theta[0, 0])
        return int((~self.phi.detach().isfinite()).nonzero()[0, 0])

    def _first_bad_stage(self) -> str:
        """Which stage's state first turns non-finite (one no-grad run on the training rows)."""
        found: list[str] = []
        solver = self._solver(self.sigmas().detach())

        def observe(k: int, stage: Stage, state: Tensor) -> None:
            if not found and not bool(state.isfinite().all()):
                found.append(f"non-finite state at stage {k} (σ = {float(stage.sigma):.6g} → {float(stage.sigma_next):.6g})")

        with torch.no_grad():
            noise = self.noise[self.train].to(torch.float64)
            labels = None if self.class_labels is None else self.class_labels[self.train]
            student_states(solver, self.denoiser, solver.init_state(noise), self.layout.expand(self.lambdas(), self.image_shape), self.layout.history, labels, observe)
        return found[0] if found else f"non-finite loss at stage {solver.num_stages - 1} (the final state's error)"

    def result(self) -> JointResult:
        """The best iterate (exactly the start if nothing beat it on the held-out rows)."""
        score, iteration, theta, phi, loss_end = self.best
        if iteration == 0:
            sigmas, lambdas = self.start_sigmas.clone(), self.start_lambdas.clone()
        else:
            sigmas = grid_from_params(theta, self.start_sigmas, self.settings.coordinate, self.settings.rho).detach()
            lambdas = (phi * self.lambda_scale).detach()
        return JointResult(
            sigmas, lambdas, self.loss_start, loss_end, self.held_start, score if self.has_held else None, self.iterations, iteration,
            self.forward_runs, self.backward_runs, self.forward_rows, self.backward_rows,
        )

    def fit(self, iterations: int, on_step: Callable[["JointFit", float], None] | None = None) -> JointResult:
        """Run `iterations` steps (plain scripts; DODECalibration calls `step` from its training loop)."""
        for _ in range(iterations):
            loss = self.step()
            if on_step is not None:
                on_step(self, loss)
        return self.result()


def hard_rows(student_final: Tensor, reference_final: Tensor, count: int) -> Tensor:
    """Indices of the `count` rows where the student lands farthest from a more accurate reference run: the seeds
    that carry a few-step sampler's RMSE (about 1 % of them hold most of it), found for a few student-sized runs
    each instead of a teacher run."""
    if not 0 <= count <= len(student_final):
        raise ValueError(f"cannot pick {count} hard seeds out of {len(student_final)}")
    distance = (student_final.to(torch.float64) - reference_final.to(torch.float64)).flatten(1).pow(2).sum(1)
    return torch.argsort(distance, descending=True, stable=True)[:count]


def stratified_weights(pool: int, hard: int, easy: int) -> tuple[float, float]:
    """Row weights of a fit on all `hard` hardest seeds of a pool of `pool` plus `easy` of the others drawn at random:
    each hard row stands for itself and each easy row for (pool − hard)/easy seeds, so the weighted mean squared
    error estimates the pool's own (a stratified estimate, unbiased, with the rare large errors always sampled).
    Normalised to a mean weight of 1 over the fitted rows."""
    if not (0 <= hard < pool and 0 < easy <= pool - hard):
        raise ValueError(f"need 0 ≤ hard < pool and 0 < easy ≤ pool − hard, got pool {pool}, hard {hard}, easy {easy}")
    easy_weight = (pool - hard) / easy
    mean = (hard + easy * easy_weight) / (hard + easy)
    return 1.0 / mean, easy_weight / mean
