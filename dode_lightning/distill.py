"""D-ODE calibration as plain tensor functions (method.md §1, §5): teacher targets, closed-form and stagewise fits.

No Lightning here; `dode_lightning.lightning` wires these into a LightningModule/DataModule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor

from .denoisers import Denoiser, NoGradDenoiser
from .grids import GRIDS, check_sigmas, make_sigmas
from .schedules import Schedule
from .solvers import SOLVERS, LambdaLayout, Solver, Stage, StageCorrector, run_stages, solver_on

__all__ = [
    "SEED_LIMIT",
    "MAX_NFE",
    "SolverSetup",
    "seeded_noise",
    "global_stream_noise",
    "build_teacher",
    "teacher_on",
    "teacher_targets",
    "fit_closed_form",
    "evaluate_lambdas",
    "stagewise_losses",
    "StageFit",
    "rmse",
    "holdout_mask",
]

TargetMode = Literal["aligned", "paper"]
# Stage-0 base loss above this fraction of the step's size means misaligned targets (StageFit.misaligned).
MISALIGNED = 0.1
# Pools the two per-stage sums across processes (identity on one process).
Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SolverSetup:
    """Everything that determines a student solver: name, NFE, schedule and grid.

    `sigmas`: given step boundaries (a λ file's, or placed by `teacher_dp`); then `grid` only names how they were
    chosen and `grid_kwargs` records the settings of that choice.
    """

    name: str
    nfe: int
    schedule: Schedule
    grid: str
    grid_kwargs: dict
    sigmas: Tensor | None = field(default=None, compare=False)

    @classmethod
    def resolve(
        cls, name: str, nfe: int, schedule: Schedule, grid: str | None = None, sigmas: Tensor | None = None, **grid_kwargs: float
    ) -> "SolverSetup":
        if name not in SOLVERS:
            raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
        if nfe > MAX_NFE:
            raise ValueError(f"NFE {nfe} is more than {MAX_NFE}; D-ODE solvers are few-step samplers (the paper uses NFE 3–25)")
        if grid is None:
            grid, defaults = SOLVERS[name].grid_for(schedule)
            grid_kwargs = {**defaults, **grid_kwargs}
        return cls(name, nfe, schedule, grid, dict(grid_kwargs), None if sigmas is None else check_sigmas(sigmas))

    def build(self) -> Solver:
        cls = SOLVERS[self.name]
        if self.sigmas is not None:
            return solver_on(cls, self.sigmas, self.schedule, self.nfe)
        sigmas = make_sigmas(self.grid, cls.steps_for_nfe(self.nfe), self.schedule, **self.grid_kwargs)
        return cls.from_grid(sigmas, self.schedule)

    def on(self, sigmas: Tensor, grid: str, **grid_kwargs: Any) -> "SolverSetup":
        """The same solver on other step boundaries (a learned grid named `grid`, chosen with `grid_kwargs`)."""
        return SolverSetup(self.name, self.nfe, self.schedule, grid, dict(grid_kwargs), check_sigmas(sigmas))


# Student NFE and teacher steps beyond these are mistakes (a typo'd 10¹² would try to allocate the grid).
MAX_NFE = 10_000
MAX_TEACHER_STEPS = 1_000_000
# EDM's generator seeds are 32-bit (its generate.py seeds with `seed % (1 << 32)`).
SEED_LIMIT = 1 << 32


def seeded_noise(
    seeds: Iterable[int], shape: tuple[int, ...], label_dim: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor | None]:
    """Latents and one-hot labels from one generator per seed, as EDM's generate.py draws them.

    Each sample depends only on its seed: randn(shape) in float32 first, then (if label_dim > 0) one label index.
    Seeds are 32-bit as in EDM; one outside [0, 2³²) is refused rather than reduced (it would repeat another seed).
    """
    latents, labels = [], []
    for seed in seeds:
        if not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed {seed} is outside 0 … {SEED_LIMIT - 1} (32-bit generator seeds)")
        gen = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=gen))
        if label_dim:
            labels.append(torch.randint(label_dim, (1,), generator=gen))
    noise = torch.stack(latents).to(dtype) if latents else torch.empty(0, *shape, dtype=dtype)
    if not label_dim:
        return noise, None
    return noise, torch.eye(label_dim, dtype=dtype)[torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)]


def global_stream_noise(
    seed: int, batch_size: int, shape: tuple[int, ...], label_dim: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor | None]:
    """Latents (and one-hot labels) of the whole batch from one stream, as the official noise-side code draws them.

    Equals `torch.manual_seed(seed); torch.randn(batch_size, *shape)` on the CPU (float32, then cast), without
    touching the global generator; labels, if any, are `randint(label_dim, (batch_size,))` drawn next from it.
    Unlike `seeded_noise`, a sample depends on the batch size and its position in the batch.
    """
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((batch_size, *shape), generator=gen).to(dtype)
    if not label_dim:
        return noise, None
    return noise, torch.eye(label_dim, dtype=dtype)[torch.randint(label_dim, (batch_size,), generator=gen)]


def _default_teacher(student: str, mode: TargetMode = "aligned", history: int = 1) -> str:
    """iPNDM and DEIS are distilled from their own family (method.md §3.2–3.3); everything else from DDIM/Euler,
    whose base trajectory is the same for noise and data prediction. With more than one direction per stage the
    accurate UniPC-3 teacher (aligned targets): measured, D-Euler NFE 10 with history 11 reaches 0.039 from it
    and 0.050 from Euler, while one λ per stage does as well or better from Euler (0.074 vs 0.076)."""
    if mode == "aligned" and history > 1:
        return "unipc_3"
    family = student.split("_")[0]
    return student if family in ("ipndm", "deis") else "euler"


def _refine(sigmas: Tensor, setup: SolverSetup, factors: list[int]) -> Tensor:
    """Split each interval [σ_j, σ_{j+1}] into factors[j] steps, equally spaced in the grid's own coordinate.

    The terminal step to σ = 0 is never split (method.md §5.3.4).
    """
    schedule, grid = setup.schedule, setup.grid
    rho = float(setup.grid_kwargs.get("rho", 7.0))
    if grid == "logsnr_uniform":
        forward, inverse = torch.log, torch.exp
    elif (grid in GRIDS and grid != "karras") or bool(torch.isinf(sigmas[0])):
        # time-uniform, quadratic, integer and flow grids, and any grid from σ = ∞ (flow matching): the schedule's time t
        forward, inverse = schedule.sigma_inv, schedule.sigma
    else:  # Karras, and given or learned σ: the Karras coordinate σ^{1/ρ} (dense where the ODE is stiff)
        forward, inverse = (lambda s: s ** (1 / rho)), (lambda u: u**rho)
    integer = grid in ("uniform_torch", "uniform", "quad", "linspace_int")
    points = [sigmas[:1]]
    for j in range(len(sigmas) - 1):
        hi, lo = sigmas[j], sigmas[j + 1]
        if float(lo) == 0.0:
            points.append(lo.reshape(1))
            continue
        u = torch.linspace(float(forward(hi)), float(forward(lo)), factors[j] + 1, dtype=torch.float64)[1:-1]
        if integer:
            u = torch.unique_consecutive(u.floor())
            u = u[(u < float(forward(hi)).__round__()) & (u > float(forward(lo)).__round__())]
        # The knot itself is appended exactly: a round trip through the coordinate would move it by an ulp.
        points.append(torch.cat([inverse(u).reshape(-1), lo.reshape(1)]))
    return torch.cat(points)


def build_teacher(
    student: Solver, setup: SolverSetup, scale: int, mode: TargetMode = "aligned", teacher: str | None = None, history: int = 1
) -> tuple[Solver, list[int]]:
    """The teacher solver and, per student stage, the index m of the teacher state xs[m] it is compared with.

    `paper` (official, method.md §5.1): the teacher has M = C·NFE steps on its own grid of the student's kind
    (integer grids: M = min(T, C·NFE); DPM-Solver: DDIM's `uniform_torch`), target of stage j is xs[(j+1)·(M//K)]
    and the last is xs[M]. `aligned` (§5.3): the teacher grid refines the student's state times R = C times per
    interval (Heun: 2C, terminal step unrefined) and each target is the teacher state at the student state's σ.
    """
    if scale < 1:
        raise ValueError(f"the teacher scale C must be ≥ 1, got {scale}")
    if scale * student.nfe > MAX_TEACHER_STEPS:
        raise ValueError(f"the teacher would take C·NFE = {scale}·{student.nfe} steps, more than {MAX_TEACHER_STEPS}; use a smaller data.scale (the paper uses 10)")
    name = teacher or _default_teacher(setup.name, mode, history)
    if name not in SOLVERS:
        raise ValueError(f"unknown teacher solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    num_stages = student.num_stages
    if mode == "paper":
        if setup.sigmas is not None:
            raise ValueError(f"paper targets need a named grid, the student runs on given σ (grid {setup.grid}); use target_mode aligned")
        grid = setup.grid
        num_timesteps = getattr(setup.schedule, "num_timesteps", None)
        if setup.name.startswith("dpm_solver_") and not setup.name.startswith("dpm_solver_pp") and num_timesteps:
            grid = "uniform_torch"  # official D-DPM-Solver: DDIM teacher on the integer grid
        steps = scale * num_stages
        if grid in ("uniform_torch", "uniform", "quad", "linspace_int"):
            steps = min(num_timesteps, steps)
        sigmas = make_sigmas(grid, steps, setup.schedule, **setup.grid_kwargs)
        stride = steps // num_stages
        wanted = [sigmas[(j + 1) * stride] for j in range(num_stages - 1)] + [sigmas[steps]]
        segments = [stride] * (num_stages - 1) + [len(sigmas) - 1 - stride * (num_stages - 1)]
    elif mode == "aligned":
        knots = torch.unique_consecutive(torch.cat([student.sigmas[:1], student.target_sigmas]))
        factor = 2 * scale if setup.name == "heun" else scale
        sigmas = _refine(knots, setup, [factor] * (len(knots) - 1))
        at_knot = [m for m, s in enumerate(sigmas) if float(s) in {float(k) for k in knots}]
        wanted = list(student.target_sigmas)
        segments = [b - a for a, b in zip(at_knot, at_knot[1:])]
    else:
        raise ValueError(f"unknown target mode {mode!r}; choose 'aligned' or 'paper'")
    solver = teacher_on(name, sigmas, student, setup.schedule, segments)
    # Targets are the teacher's finished states, never a predictor or an inner node of a multi-evaluation step.
    slots = solver.state_slots()
    missing = [f"{float(s):.4g}" for s in wanted if float(s) not in slots]
    if missing:
        raise ValueError(f"teacher {name} has no finished state at σ = {', '.join(missing)}; choose another teacher")
    return solver, [slots[float(s)] for s in wanted]


def teacher_on(name: str, sigmas: Tensor, student: Solver, schedule: Schedule, segments: list[int]) -> Solver:
    """Solver `name` as the teacher of `student` on `sigmas`, integrating the student's form of the state; its state
    is complete after each of `segments` (interval counts between the student's knots)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown teacher solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    scaled_states = bool((student.scales != 1).any())  # VP or flow states: the teacher integrates the same form
    scales = schedule.scale(sigmas) if scaled_states else None
    noise_scales = schedule.noise_scale(sigmas) if scaled_states else None  # β = 1 at σ = ∞ (flow)
    return SOLVERS[name].teacher(sigmas, scales, student.unit_prior, segments, noise_scales)


def teacher_targets(
    teacher: Solver,
    indices: list[int],
    denoiser: Denoiser,
    noise: Tensor,
    class_labels: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Run the teacher once and keep only the states xs[m] for m in `indices`: (K, B, …), memory O(K·B·D).

    xs[0] is the initial state and xs[j + 1] the output of the teacher's stage j (`Solver.state_slots`).
    """
    # Written in place into one preallocated (K, B, …) tensor, so the peak is the cache itself, not twice it.
    targets = noise.new_empty((len(indices), *noise.shape))
    slots: dict[int, list[int]] = {}
    for k, m in enumerate(indices):
        slots.setdefault(m, []).append(k)
    for k in slots.get(0, []):
        targets[k] = teacher.init_state(noise)

    def keep(j: int, stage: Stage, state: Tensor) -> None:
        for k in slots.get(j + 1, []):
            targets[k] = state
        if progress is not None:
            progress(j)

    teacher.sample(denoiser, noise, class_labels=class_labels, observe=keep)
    return targets


@dataclass
class StageFit:
    """Per-stage record of a fit: λ, the squared-error sums before/after the correction, and ⟨Δ,r⟩, ⟨Δ,Δ⟩."""

    lambdas: Tensor
    loss_base: Tensor
    loss_fit: Tensor
    delta_dot_residual: Tensor
    delta_dot_delta: Tensor
    coeffs: Tensor
    sigmas: Tensor
    elements: float
    """Number of squared errors each loss averages over (pooled)."""
    loss_step: Tensor
    """Mean squared size of each base update, ‖x̃_k − x_k‖²/n: the yardstick of `misaligned`."""
    layout: LambdaLayout = field(default_factory=LambdaLayout)
    """What each stage's λ holds; `lambdas` is (K,) or (K, m, G) accordingly."""
    dropped: list[int] = field(default_factory=list)
    """Stages the never-worse guard set to λ = 0 (their λ did not lower the held-out loss)."""
    held_base: Tensor | None = None
    held_fit: Tensor | None = None
    """Guard only: per stage, the held-out samples' squared-error sums at λ = 0 and at the fitted λ."""

    def misaligned(self, threshold: float = MISALIGNED) -> bool:
        """Whether stage 0's target looks like a state at another noise level.

        Stage 0 starts from the teacher's own initial state, so its base loss is one step's truncation error:
        measured ≤ 0.05 of the step (‖x̃_0 − x_0‖²) for correct targets of every solver and teacher at NFE ≥ 3,
        0.12 for the Heun-teacher bug of issue 14 (targets half a student step off).
        """
        return bool(self.loss_base[0] > threshold * self.loss_step[0])

    def natural_scales(self) -> Tensor:
        """c_k = ‖x*_k − x̃_k‖ / ‖Δ_k‖, the Cauchy–Schwarz bound on |λ_k| (1 where Δ_k vanishes).

        Taken at λ = 0 it puts every stage's λ on an O(1) scale for gradient fits (paper-unit λ can reach 10³
        where two evaluations at the same σ nearly agree).
        """
        scales = torch.sqrt(self.loss_base * self.elements / self.delta_dot_delta)
        return torch.where(self.delta_dot_delta > 0, scales, torch.ones_like(scales))


def fit_closed_form(
    student: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    targets: Tensor,
    class_labels: Tensor | None = None,
    reduce: Reduce | None = None,
    layout: LambdaLayout | None = None,
    holdout: Tensor | None = None,
) -> StageFit:
    """The paper's sequential least squares (Eq. 14): stage by stage λ_k = ⟨Δ_k, x*_k − x̃_k⟩ / ⟨Δ_k, Δ_k⟩.

    With a `layout` of m directions and G groups each stage solves G m×m systems ⟨Δ_i, Δ_j⟩_g λ_g = ⟨Δ_i, r⟩_g
    instead (the same sums, per group and direction pair). Sums run over batch × pixels in float64; the student
    continues from its own corrected state. `reduce` pools the per-stage sums across processes, making every
    rank's λ equal to the fit on the union batch (§1). Losses are mean squared errors per element over the
    pooled batch.

    `holdout` (bool per sample) is the never-worse guard: those samples are left out of the sums, a stage whose
    λ does not lower their loss keeps λ_k = 0 (listed in `StageFit.dropped`), and if the λ do not bring their
    final state closer to the teacher's than the base solver does, every λ is 0.
    """
    return _stage_pass(student, denoiser, noise, targets, class_labels, reduce, None, layout or LambdaLayout(), holdout)


def evaluate_lambdas(
    student: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    targets: Tensor,
    lambdas: Tensor,
    class_labels: Tensor | None = None,
    reduce: Reduce | None = None,
    layout: LambdaLayout | None = None,
) -> StageFit:
    """The same per-stage statistics as `fit_closed_form`, for given compact λ (e.g. from the Adam fit)."""
    return _stage_pass(student, denoiser, noise, targets, class_labels, reduce, lambdas, layout or LambdaLayout(), None)


def holdout_mask(seeds: Iterable[int], fraction: float) -> Tensor:
    """The guard's held-out samples: a `fraction` of the seeds, spread evenly and fixed by the seed alone (so
    every rank and every batch order agree)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    return torch.tensor([math.floor((s + 1) * fraction) > math.floor(s * fraction) for s in seeds], dtype=torch.bool)


def _stage_pass(
    student: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    targets: Tensor,
    class_labels: Tensor | None,
    reduce: Reduce | None,
    fixed: Tensor | None,
    layout: LambdaLayout,
    holdout: Tensor | None,
) -> StageFit:
    reduce = reduce or (lambda t: t)
    num = student.num_stages
    image_shape = tuple(noise.shape[1:])
    groups = layout.group_index(image_shape).reshape(-1)
    one_hot = torch.nn.functional.one_hot(groups, layout.num_groups(image_shape)).to(torch.float64)  # (E, G)
    keys = ("base", "fit", "dr", "dd", "coeff", "sigma", "step", "held_base", "held_fit")
    record = {key: torch.zeros(num, dtype=torch.float64) for key in keys}
    lambdas = torch.zeros(layout.shape(num, image_shape), dtype=torch.float64)
    held = torch.zeros(len(noise), dtype=torch.bool) if holdout is None else holdout.to(torch.bool)
    train = ~held
    guard = bool(reduce(held.sum().to(torch.float64)) > 0)
    dropped: list[int] = []
    previous = [student.init_state(noise)]
    count = reduce(torch.tensor(float(targets[0].numel()), dtype=torch.float64))

    def apply(lam: Tensor) -> Tensor:
        """Compact λ of one stage → what the corrector applies (a scalar, or (m, *image_shape))."""
        return lam if layout.scalar else lam[:, groups.reshape(image_shape)]

    def choose(k: int, stage: Stage) -> Tensor:
        residual = (targets[k] - stage.base).to(torch.float64).flatten(1)  # (B, E)
        directions = torch.stack([d.to(torch.float64).flatten(1) for d in corrector.directions(stage)])  # (m_k, B, E)
        m_k = len(directions)
        fit_dirs, fit_res = directions[:, train], residual[train]
        gram = torch.einsum("ibe,jbe->ije", fit_dirs, fit_dirs) @ one_hot  # (m_k, m_k, G)
        vec = torch.einsum("ibe,be->ie", fit_dirs, fit_res) @ one_hot  # (m_k, G)
        pooled = reduce(torch.cat([gram.flatten(), vec.flatten()]))
        gram, vec = pooled[: gram.numel()].reshape(gram.shape), pooled[gram.numel() :].reshape(vec.shape)
        record["dr"][k], record["dd"][k] = vec[0].sum(), gram[0, 0].sum()
        if fixed is not None:
            lam = fixed[k].detach().to(torch.float64)
        else:
            # Per group, the least-squares λ of the m_k directions (pseudo-inverse: collinear directions get no
            # extra weight, a vanishing Δ gets λ = 0).
            solved = torch.linalg.pinv(gram.permute(2, 0, 1), rtol=1e-12, hermitian=True) @ vec.T.unsqueeze(-1)  # (G, m_k, 1)
            lam = torch.zeros(layout.shape(1, image_shape)[1:], dtype=torch.float64)
            if layout.scalar:
                lam = solved.reshape(())
            else:
                lam[:m_k] = solved[..., 0].T
            if guard:
                applied = apply(lam)
                correction = applied * directions[0] if layout.scalar else (applied[:m_k].flatten(1).unsqueeze(1) * directions).sum(0)
                losses = reduce(torch.stack([(residual[held] ** 2).sum(), ((residual - correction)[held] ** 2).sum()]))
                record["held_base"][k], record["held_fit"][k] = losses
                if not losses[1] < losses[0]:
                    lam = torch.zeros_like(lam)
                    dropped.append(k)
        lambdas[k] = lam
        return apply(lam)

    def observe(k: int, stage: Stage, state: Tensor) -> None:
        record["base"][k] = reduce(((targets[k] - stage.base).to(torch.float64) ** 2).sum()) / count
        record["fit"][k] = reduce(((targets[k] - state).to(torch.float64) ** 2).sum()) / count
        record["coeff"][k], record["sigma"][k] = stage.coeff, stage.sigma
        record["step"][k] = reduce(((stage.base - previous[0]).to(torch.float64) ** 2).sum()) / count
        previous[0] = state

    corrector = StageCorrector(choose, layout.history)
    with torch.no_grad():
        final = run_stages(student.stages(previous[0]), denoiser, observe=observe, corrector=corrector, class_labels=class_labels)
        if guard and fixed is None and not _helps_at_the_end(student, denoiser, noise, targets[-1], class_labels, held, final, reduce):
            dropped[:] = [k for k, free in enumerate(student.lambda_fitted) if free]
            lambdas.zero_()
    return StageFit(
        lambdas, record["base"], record["fit"], record["dr"], record["dd"], record["coeff"], record["sigma"], float(count),
        record["step"], layout, dropped, record["held_base"], record["held_fit"],
    )


def _helps_at_the_end(
    student: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    target: Tensor,
    class_labels: Tensor | None,
    held: Tensor,
    final: Tensor,
    reduce: Reduce,
) -> bool:
    """Whether the fitted λ bring the held-out samples' final state closer to the teacher's than the base solver.

    Stage by stage a λ can lower its own loss and still make the end worse (later steps of a high-order solver
    cancel part of the earlier errors); this is the guard's last check, one base run on the held-out samples.
    """
    errors = torch.zeros(2, dtype=torch.float64)
    if bool(held.any()):  # a rank may hold none of the held-out seeds; it still takes part in the reduction
        labels = None if class_labels is None else class_labels[held]
        base = student.sample(denoiser, noise[held], class_labels=labels)
        errors = torch.stack([((target[held] - final[held]).to(torch.float64) ** 2).sum(), ((target[held] - base).to(torch.float64) ** 2).sum()])
    errors = reduce(errors)
    return bool(errors[0] < errors[1])


def stagewise_losses(
    student: Solver,
    denoiser: Denoiser,
    noise: Tensor,
    targets: Tensor,
    lambdas: Tensor,
    class_labels: Tensor | None = None,
    layout: LambdaLayout | None = None,
) -> Tensor:
    """Per-stage mean squared error ‖x*_k − (x̃_k + λ_kΔ_k)‖² / n; differentiable in λ only.

    The network runs under no-grad and the state sent on is detached (run_stages), so stage k's loss reaches only
    λ_k: the gradient of the sum is the per-stage objective of the closed form, for the Adam fit.
    """
    losses = []

    def observe(k: int, stage: Stage, state: Tensor) -> None:
        losses.append(((targets[k] - state).to(torch.float64) ** 2).mean())

    layout = layout or LambdaLayout()
    applied = layout.expand(lambdas, noise.shape[1:])
    run_stages(student.stages(student.init_state(noise)), NoGradDenoiser(denoiser), lambda k, _s: applied[k], observe, layout.history, class_labels=class_labels)
    return torch.stack(losses)


def rmse(x: Tensor, reference: Tensor) -> float:
    """Root mean squared error over all elements."""
    return math.sqrt(float(((x.to(torch.float64) - reference.to(torch.float64)) ** 2).mean()))
