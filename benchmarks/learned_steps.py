"""Learned step positions against the learned-schedule peers (issue 18 item 6): GITS, LD3 and the package's joint fit.

Every method calibrates on seeds 0–99 against the same teacher budget and is scored on held-out seeds from
1,000,000: RMSE of the final state to the reference ODE state where the run ends (the exact model's ODE solution;
on the learned network its own 128-step Heun ODE), and the median and 99th percentile of the per-seed RMSE.
Calibration cost: network sample-evaluations (calls × batch rows), forward and backward counted apart, and CPU
seconds of the whole calibration (teacher included).

Peers, from their papers' descriptions (no code of theirs):
- GITS (Chen et al., ICML 2024): an iPNDM teacher on a fine Karras ρ = 7 grid (M steps, σ_max → σ_min) run on the
  calibration batch; the one-step cost c_ij = mean over latents of ‖x_i + (σ_j − σ_i)·d_i − x_j‖₂ (d_i the ODE
  derivative the teacher evaluated at x_i); dynamic programming picks the N steps from point 0 to M with the least
  summed cost (the k-th step's cost times coef^k). The base solver (iPNDM, or UniPC-3) then samples on that grid.
- LD3 (Tong et al., ICLR 2025): the N + 1 step positions as softmax increments in log σ between σ_max and σ_min,
  learned by backpropagating the base student's final-state L2 error to the teacher's final state, with soft
  teacher forcing (each training latent may move in a ball of radius 0.001·D/N²); 50 training and 50 validation
  latents, the best-validation iterate kept; full-batch L-BFGS (the authors' batch-2 RMSprop did not converge here).
  This is `dode_lightning.joint_fit` with λ off, so the peer and the product share the differentiable student.
Package rows: the closed-form D `history all` λ on the GITS grid, and the joint fit of σ and those λ from there
(`model.fit: joint`, L-BFGS, 20 % of the calibration seeds held out by the never-worse guard).
Usage: PYTHONPATH=. python benchmarks/learned_steps.py [--quick] [--model exact|network] [--nfe 3,4,5,6,8,10] [--out-dir docs] [--render]
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from benchmarks.common import CALIBRATION_SEEDS, HELD_OUT_START, SCALE, ExactStates, machine, markdown_table, output_dir, parser
from dode_lightning.denoisers import Denoiser
from dode_lightning.distill import SolverSetup, StageFit, build_teacher, fit_closed_form, holdout_mask, seeded_noise, teacher_targets
from dode_lightning.grids import karras_sigmas
from dode_lightning.joint_fit import JointFit, JointSettings
from dode_lightning.placement import placed_sigmas, teacher_trajectory
from dode_lightning.schedules import EDM
from dode_lightning.solvers import SOLVERS, LambdaLayout, Solver

NFES = [3, 4, 5, 6, 8, 10]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
TEACHER = "unipc_3"
GITS_STEPS, GITS_COEF = 100, 1.0
GITS_STUDENTS = ["ipndm", "unipc_3"]
LD3_STUDENTS = ["unipc_3", "ipndm"]
JOINT_STUDENTS = ["ipndm", "unipc_3"]
GUARD = 0.2


def iterations(nfe: int) -> int:
    """L-BFGS iterations of LD3 and the joint fit: 30 at NFE 10, more at fewer steps (about the same evaluations)."""
    return max(30, 300 // nfe)


class Counter(torch.nn.Module):
    """A denoiser that counts sample-evaluations: rows per call, and rows whose output a backward pass will reach
    (the call's state or σ carries a graph). A module, so it can stand in for a loaded network (benchmarks/best_configs.py)."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.forward_rows = self.backward_rows = 0

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        self.forward_rows += len(x)
        if torch.is_grad_enabled() and (x.requires_grad or (isinstance(sigma, Tensor) and sigma.requires_grad)):
            self.backward_rows += len(x)
        return self.denoiser(x, sigma, class_labels)


@dataclass
class Calibrated:
    """A calibrated sampler: its solver (on its grid), λ as the sampler takes them, and what calibration cost."""

    method: str
    solver: Solver
    lambdas: Tensor | None
    forward: int
    backward: int
    cpu_seconds: float
    note: str = ""
    scores: dict[str, float] = field(default_factory=dict)


def gits_grid(counter: Counter, noise: Tensor, nfe: int, steps: int = GITS_STEPS, coef: float = GITS_COEF) -> Tensor:
    """GITS: the N + 1 knots (σ_max … σ_min) picked from an iPNDM teacher's fine Karras grid by dynamic programming
    (the package's own placement, `model.grid: teacher_dp`)."""
    teacher = SOLVERS["ipndm"].from_grid(karras_sigmas(steps + 1, SIGMA_MIN, SIGMA_MAX), EDM())
    return placed_sigmas(teacher_trajectory(teacher, counter, noise), nfe, coef)


def _setup(name: str, nfe: int, grid: str, **kwargs: float) -> SolverSetup:
    return SolverSetup.resolve(name, nfe, EDM(), grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **kwargs)


def teacher_final(counter: Counter, student: Solver, setup: SolverSetup, noise: Tensor) -> Tensor:
    """The shared teacher's (UniPC-3, C = SCALE) final state at the student's end σ."""
    teacher, indices = build_teacher(student, setup, SCALE, "aligned", TEACHER)
    return teacher_targets(teacher, indices[-1:], counter, noise)[0]


def run_gits(denoiser: Denoiser, noise: Tensor, nfe: int, held: Callable[[Calibrated], dict]) -> Calibrated:
    """GITS grid, each base student on it; the better one on the held-out seeds counts (its grid needs no λ)."""
    counter, start = Counter(denoiser), time.process_time()
    sigmas = gits_grid(counter, noise, nfe)
    seconds = time.process_time() - start
    rows = [Calibrated("GITS", SOLVERS[name].from_grid(sigmas, EDM()), None, counter.forward_rows, 0, seconds, name) for name in GITS_STUDENTS]
    for row in rows:
        row.scores = held(row)
    return min(rows, key=lambda r: r.scores["rmse"])


def run_ld3(denoiser: Denoiser, noise: Tensor, nfe: int, held: Callable[[Calibrated], dict]) -> Calibrated:
    """LD3: log-SNR-uniform N + 1 grid, σ learned end to end with slack, λ off, best validation iterate."""
    rows = []
    for name in LD3_STUDENTS:
        counter, start = Counter(denoiser), time.process_time()
        setup = _setup(name, nfe, "logsnr_uniform", terminal_zero=False)
        student = setup.build()
        target = teacher_final(counter, student, setup, noise)
        validation = torch.arange(len(noise)) >= len(noise) // 2
        radius = 0.001 * noise[0].numel() / nfe**2
        settings = JointSettings(fit_lambdas=False, slack=radius)
        fit = JointFit(name, student.sigmas, EDM(), counter, noise, target, torch.zeros(student.num_stages, dtype=torch.float64), LambdaLayout(), settings, held=validation)
        result = fit.fit(iterations(nfe))
        row = Calibrated("LD3", SOLVERS[name].from_grid(result.sigmas, EDM()), None, counter.forward_rows, counter.backward_rows, time.process_time() - start, f"{name}, kept it. {result.best_iteration}/{result.iterations}")
        row.scores = held(row)
        rows.append(row)
    return min(rows, key=lambda r: r.scores["rmse"])


def run_package(denoiser: Denoiser, noise: Tensor, nfe: int, held: Callable[[Calibrated], dict]) -> list[Calibrated]:
    """Per student: D h-all closed form on the GITS grid; from there the joint fit of σ and λ (`model.fit: joint`);
    and the joint fit of σ with λ held, then λ in closed form on the fitted σ (`joint_lambdas: false`,
    `joint_refit: true`). For each recipe the better student counts."""
    out: dict[str, list[Calibrated]] = {"dp": [], "joint": [], "refit": []}
    guard = holdout_mask(CALIBRATION_SEEDS, GUARD)
    for name in JOINT_STUDENTS:
        counter, start = Counter(denoiser), time.process_time()
        sigmas = gits_grid(counter, noise, nfe)
        setup = _setup(name, nfe, "karras")
        layout = LambdaLayout(nfe)

        def closed_on(grid: Tensor) -> tuple[Solver, Tensor, StageFit]:
            student = SOLVERS[name].from_grid(grid, EDM())
            teacher, indices = build_teacher(student, setup, SCALE, "aligned", TEACHER)
            targets = teacher_targets(teacher, indices, counter, noise)
            return student, targets, fit_closed_form(student, counter, noise, targets, layout=layout, holdout=guard)

        def row(method: str, student: Solver, lambdas: Tensor, seconds: float, note: str) -> Calibrated:
            return Calibrated(method, student, layout.expand(lambdas, noise.shape[1:]), counter.forward_rows, counter.backward_rows, seconds, note)

        student, targets, closed = closed_on(sigmas)
        out["dp"].append(row("DP grid + D h-all", student, closed.lambdas, time.process_time() - start, name))
        dp_forward, dp_seconds = counter.forward_rows, out["dp"][-1].cpu_seconds
        for key, settings in (("joint", JointSettings()), ("refit", JointSettings(fit_lambdas=False))):
            # Each recipe's cost: the DP teacher and closed form it starts from, then its own fit.
            counter.forward_rows, counter.backward_rows, start = dp_forward, 0, time.process_time() - dp_seconds
            fit = JointFit(name, sigmas, EDM(), counter, noise, targets[-1], closed.lambdas, layout, settings, lambda_scale=closed.natural_scales(), held=guard)
            result = fit.fit(iterations(nfe))
            note = f"{name}, kept it. {result.best_iteration}/{result.iterations}"
            if key == "joint":
                out[key].append(row("joint σ + D h-all", SOLVERS[name].from_grid(result.sigmas, EDM()), result.lambdas, time.process_time() - start, note))
            else:
                refitted, _, again = closed_on(result.sigmas)
                out[key].append(row("joint σ, then D h-all", refitted, again.lambdas, time.process_time() - start, note))
    for rows in out.values():
        for calibrated in rows:
            calibrated.scores = held(calibrated)
    return [min(rows, key=lambda r: r.scores["rmse"]) for rows in out.values()]


class HeldOut:
    """Per-seed RMSE of a calibrated sampler on held-out latents against the reference states where it ends."""

    def __init__(self, denoiser: Denoiser, reference, noise: Tensor) -> None:
        self.denoiser, self.noise = denoiser, noise
        self.exact = ExactStates(reference, noise)

    def __call__(self, row: Calibrated) -> dict[str, float]:
        with torch.no_grad():
            return self.score(row.solver.sample(self.denoiser, self.noise, row.lambdas), row.solver)

    def per_seed_mse(self, out: Tensor, solver: Solver) -> Tensor:
        """Mean squared error of each final state `out` of `solver` on these latents to the reference state."""
        return ((out - self.exact(solver)).flatten(1) ** 2).mean(1)

    def score(self, out: Tensor, solver: Solver) -> dict[str, float]:
        """RMSE, median and p99 of the per-seed RMSE of final states `out` of `solver` on these latents."""
        per_seed = self.per_seed_mse(out, solver)
        return {
            "rmse": math.sqrt(float(per_seed.mean())),
            "median": math.sqrt(float(per_seed.median())),
            "p99": math.sqrt(float(torch.quantile(per_seed, 0.99))),
        }


def load_model(model: str) -> tuple[Denoiser, object, int]:
    """The denoiser, its reference ODE solver and the default number of held-out seeds."""
    if model == "exact":
        from dode_lightning.gmm import digits_mixture

        mixture = digits_mixture()
        return mixture, mixture, 500
    from benchmarks.learned import FineHeun
    from benchmarks.train_digits_net import DIGITS_NET_PATH
    from dode_lightning.checkpoints import load_denoiser

    network = load_denoiser("edm_pickle", path=str(DIGITS_NET_PATH)).denoiser.eval().requires_grad_(False)
    return network, FineHeun(network, 128), 200


def cells(row: Calibrated, best_peer: float | None) -> list[str]:
    s = row.scores
    ratio = "—" if best_peer is None else f"{s['rmse'] / best_peer:.2f}×"
    return [row.method, row.note, f"{s['rmse']:.4f}", ratio, f"{s['median']:.4f}", f"{s['p99']:.4f}", f"{row.forward:,}", f"{row.backward:,}", f"{row.cpu_seconds:.1f}"]


HEADER = ["method", "student, notes", "RMSE", "/ best peer", "median", "p99", "forward evals", "backward evals", "CPU s"]


RESULTS = Path("docs/learned_steps.json")
PACKAGE_METHODS = ("DP grid + D h-all", "joint σ + D h-all", "joint σ, then D h-all")


def summary(done: dict, keys: list[str]) -> str:
    """One row per NFE: RMSE (median) of each method, the package's best over the best peer, its cost."""
    rows = []
    for key in keys:
        by_method = {row[0]: row for row in done[key]["rows"]}
        cells = [key.split()[1]]
        for method in ("GITS", "LD3", *PACKAGE_METHODS):
            row = by_method[method]
            cells.append(f"{row[2]} ({row[4]})")
        peer = min(float(by_method[m][2]) for m in ("GITS", "LD3"))
        best = min(PACKAGE_METHODS, key=lambda m: float(by_method[m][2]))
        cost = by_method[best]
        cells += [f"{float(cost[2]) / peer:.2f}× ({best})", f"{cost[6]} / {cost[7]} / {cost[8]} s"]
        rows.append(cells)
    header = ["NFE", "GITS", "LD3", *PACKAGE_METHODS, "package best / best peer", "its forward / backward evals / CPU"]
    return "RMSE (median per-seed RMSE):\n\n" + markdown_table(header, rows)


def render(done: dict) -> str:
    """docs/learned_steps.md from the collected rows (both models, every NFE run so far)."""
    sections = []
    for model, title in (("exact", "Exact digits model (500 held-out seeds, reference: the exact ODE)"), ("network", "Learned digits network (200 held-out seeds, reference: its own 128-step Heun ODE)")):
        keys = sorted((k for k in done if k.startswith(model + " ")), key=lambda k: int(k.split()[1]))
        if not keys:
            continue
        parts = [f"## {title}", summary(done, keys)]
        for key in keys:
            entry = done[key]
            parts.append(f"### NFE {key.split()[1]}\n\n`{entry['command']}` — {entry['machine']}; {entry['seconds']:.0f} s wall\n\n" + markdown_table(HEADER, entry["rows"]))
        sections.append("\n\n".join(parts))
    return "# Learned step positions: the joint fit against GITS and LD3 (issue 18)\n\n" + DOC + "\n\n" + "\n\n".join(sections) + "\n"


DOC = """Generated by `benchmarks/learned_steps.py` (one section per model and NFE; rerun an NFE to replace it).
Calibration on seeds 0–99 for every method, the same teacher (UniPC-3, C = 10 × the student's steps, `aligned`
grid) wherever a teacher endpoint is used; scores on held-out seeds from 1,000,000. **RMSE** over all held-out
seeds of the final state against the reference ODE state where the run ends; **median** and **p99**: of the
per-seed RMSE (about 1 % of the seeds carry the RMSE at NFE ≥ 6). "/ best peer": RMSE over the better of GITS and
LD3. Cost: network sample-evaluations of the whole calibration (teacher runs included; backward = evaluations a
backward pass went through) and CPU seconds (one torch thread, a shared 2-core machine).

- **GITS**: iPNDM teacher on a 100-step Karras ρ = 7 grid (80 → 0.002), one-step costs c_ij = mean ‖x_i + (σ_j −
  σ_i)·d_i − x_j‖₂, dynamic programming for the N steps with least summed cost (coefficient 1) — the package's
  `dode_lightning.placement` (`model.grid: teacher_dp`); the better of the base iPNDM and UniPC-3 on that grid counts.
- **LD3**: `dode_lightning.joint_fit` with λ off: the N + 1 steps (σ_max, σ_min fixed) as softmax increments in
  log σ from the log-SNR-uniform grid, L-BFGS on the final-state L2 error to the teacher with soft teacher forcing
  (ball radius 0.001·D/N²), 50 training / 50 validation latents, best-validation iterate; the better of UniPC-3
  and iPNDM counts.
- **DP grid + D h-all** (package): the GITS grid with closed-form λ over all earlier outputs (`history` = NFE),
  aligned targets from the UniPC-3 teacher (train.py's `grid: teacher_dp` reads them from the placement run itself:
  `benchmarks/best_configs.py`), 20 % of the seeds held out by the never-worse guard.
- **joint σ + D h-all** (package, `model.fit: joint`): from there, σ and λ fitted together end to end (log σ
  coordinate), the best iterate on the held-out 20 % kept.
- **joint σ, then D h-all** (package, `model.fit: joint`, `joint_lambdas: false`, `joint_refit: true`): from the
  same start σ fitted end to end with the closed-form λ held, then λ refitted in closed form on the fitted σ (one
  more teacher run there).

LD3 and the joint fit run max(30, 300 // NFE) L-BFGS iterations (strong Wolfe line search, ≤ 20 trials each)."""


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=["exact", "network"], default="exact")
    args_parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default 3,4,5,6,8,10)")
    args_parser.add_argument("--held-out", type=int, default=None, help="held-out seeds (default 500 exact, 200 network)")
    args_parser.add_argument("--render", action="store_true", help="only rewrite learned_steps.md from learned_steps.json")
    args = args_parser.parse_args()
    out = output_dir(args)
    if args.render:
        (out / "learned_steps.md").write_text(render(json.loads((out / RESULTS.name).read_text())))
        return
    torch.set_num_threads(1)
    nfes = [5] if args.quick and not args.nfe else [int(n) for n in (args.nfe or ",".join(map(str, NFES))).split(",")]
    denoiser, reference, count = load_model(args.model)
    count = 50 if args.quick else (args.held_out or count)
    noise = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))[0]
    held = HeldOut(denoiser, reference, seeded_noise(range(HELD_OUT_START, HELD_OUT_START + count), (1, 8, 8))[0])
    results = None if out is None else out / RESULTS.name
    done = json.loads(results.read_text()) if results is not None and results.exists() else {}
    for nfe in nfes:
        start = time.perf_counter()
        rows = [run_gits(denoiser, noise, nfe, held), run_ld3(denoiser, noise, nfe, held), *run_package(denoiser, noise, nfe, held)]
        peer = min(r.scores["rmse"] for r in rows[:2])
        command = f"PYTHONPATH=. python benchmarks/learned_steps.py --model {args.model} --nfe {nfe}" + (" --quick" if args.quick else "") + (f" --held-out {count}" if args.held_out else "")
        entry = {"rows": [cells(r, peer) for r in rows], "command": command, "machine": machine(), "seconds": time.perf_counter() - start}
        print(f"{args.model} NFE {nfe} ({entry['seconds']:.0f} s)\n" + markdown_table(HEADER, entry["rows"]), flush=True)
        if results is not None:  # after every NFE, so a long run leaves its finished part behind
            done[f"{args.model} {nfe}"] = entry
            out.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(done, indent=1))
            (out / "learned_steps.md").write_text(render(done))


if __name__ == "__main__":
    main()
