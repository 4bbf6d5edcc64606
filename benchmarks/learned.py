"""Quality vs NFE on the learned digits network (the second testbed): base solver vs its D-variants.

The exact mixture has no score error, so it cannot show a fitted correction overfitting its calibration batch; this
network (benchmarks/train_digits_net.py, shipped as dode_lightning/data/edm_digits_net.pkl, loaded through
`load_denoiser("edm_pickle", …)`) can. Reference: the network's own probability-flow ODE solved by Heun with
--reference-steps Karras steps from where each run starts to where it ends, checked against half the steps.
Calibration: C = 10, |B| = 100 (seeds 0–99) or 10, `aligned` targets from a UniPC-3 teacher, closed form; variants
from one λ per stage to history m = all × 2×2 spatial blocks, with and without the never-worse guard. Reported per
run: RMSE to the reference on held-out seeds (from 1,000,000) and on the seeds the λ were fitted on (the
generalisation gap), and the Fréchet distance in pixel space of the held-out samples to the training data.
Usage: PYTHONPATH=. python benchmarks/learned.py [--quick] [--held-out 200] [--families euler,unipc_3] [--out-dir docs]
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import (
    CALIBRATION_SEEDS,
    HELD_OUT_START,
    SCALE,
    ExactStates,
    ReferenceODE,
    Family,
    family_panels,
    figure_path,
    frechet_distance,
    machine,
    markdown_table,
    output_dir,
    parser,
    write_section,
)
from benchmarks.quality import PEER_TEACHER, nfes_for
from benchmarks.train_digits_net import DIGITS_NET_PATH
from dode_lightning.checkpoints import load_denoiser
from dode_lightning.denoisers import Denoiser
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, holdout_mask, rmse, seeded_noise, teacher_targets
from dode_lightning.gmm import digits_data, digits_mixture
from dode_lightning.grids import append_zero, karras_sigmas
from dode_lightning.solvers import LambdaLayout, Solver, run_stages
from dode_lightning.solvers.first_order import heun_stages

NFES = [4, 5, 6, 8, 10]
# Heun realises only odd NFE; 9 stands in for 8/10 as in the paper's grid.
HEUN_EXTRA = [9]
# The families on the EDM schedule (one reference ODE solution serves them all), UniPC the strongest peer.
FAMILIES = {
    "euler": Family("euler", "edm", "Euler-x₀ = EDM DDIM (Karras)"),
    "heun": Family("heun", "edm", "Heun = EDM (Karras)"),
    "dpm_solver_pp_3m": Family("dpm_solver_pp_3m", "edm", "DPM-Solver++ 3M (Karras)"),
    "unipc_3": Family("unipc_3", "edm", "UniPC-3 (Karras)"),
}
FAMILY_NAMES = ["euler", "unipc_3"]


class FineHeun:
    """A denoiser's probability-flow ODE solved by Heun with many steps: the reference for a network.

    Karras ρ = 7 grid of `steps` steps from σ_start down to max(σ_end, σ_min); for σ_end = 0 the run closes with
    EDM's final Euler step to 0 (x ← D(x; σ_min)), as every EDM-side sampler here does.
    """

    def __init__(self, denoiser: Denoiser, steps: int, sigma_min: float = 0.002) -> None:
        self.denoiser, self.steps, self.sigma_min = denoiser, steps, sigma_min

    def exact_endpoint(self, x: Tensor, sigma_start: float, *, sigma_end: float = 0.0) -> Tensor:
        sigmas = karras_sigmas(self.steps + 1, max(sigma_end, self.sigma_min), sigma_start)
        if sigma_end == 0.0:
            sigmas = append_zero(sigmas)
        with torch.no_grad():
            return run_stages(heun_stages(x.to(torch.float64), sigmas), self.denoiser)


@dataclass(frozen=True)
class Variant:
    """A sampler variant: base solver, or a D-variant with the capacity options of `LambdaLayout` (history m,
    0 = all earlier outputs; λ groups), the never-worse guard (held-out fraction) and its calibration batch |B|."""

    label: str
    distilled: bool = True
    history: int = 1
    groups: str = "none"
    guard: float = 0.0
    batch: int = len(CALIBRATION_SEEDS)

    def layout(self, student: Solver) -> LambdaLayout:
        return LambdaLayout(self.history or student.num_stages, self.groups)


# From one λ per stage up to the most capacity (all earlier outputs × 2×2 spatial blocks), the latter also on a tenth
# of the calibration batch: where a correction overfits, its held-out error rises while its calibration error falls.
VARIANTS = [
    Variant("base", distilled=False),
    Variant("D"),
    Variant("D h-all", history=0),
    Variant("D h-all+guard", history=0, guard=0.2),
    Variant("D h-all blocks:2", history=0, groups="blocks:2"),
    Variant("D h-all blocks:2, |B|=10", history=0, groups="blocks:2", batch=10),
]


def calibrate(variant: Variant, student: Solver, denoiser: Denoiser, calib: Tensor, targets: Tensor) -> tuple[Tensor | None, list[int]]:
    """The variant's λ (expanded as the sampler takes them) and the stages its guard dropped."""
    if not variant.distilled:
        return None, []
    layout = variant.layout(student)
    noise, targets = calib[: variant.batch], targets[:, : variant.batch]
    holdout = holdout_mask(range(variant.batch), variant.guard) if variant.guard else None
    fit = fit_closed_form(student, denoiser, noise, targets, layout=layout, holdout=holdout)
    return layout.expand(fit.lambdas, noise.shape[1:]), fit.dropped


class Measure:
    """Runs a sampler on held-out and calibration latents together and scores it against the reference states."""

    def __init__(self, denoiser: Denoiser, reference: ReferenceODE, held_out: Tensor, calib: Tensor, data: Tensor, chunk: int) -> None:
        self.denoiser, self.held_count = denoiser, len(held_out)
        self.noise = torch.cat([held_out, calib])
        self.exact = ExactStates(reference, self.noise, chunk)
        self.runs: dict[tuple[float, float], Solver] = {}
        flat = data.reshape(len(data), -1).to(torch.float64)
        self.data_mean, self.data_cov = flat.mean(0), torch.cov(flat.T)

    def data_fd(self, solver: Solver, samples: Tensor) -> float:
        """FD of samples to the data's moments, moved to the marginal at the σ (and scale) where the run ends."""
        sigma, scale = float(solver.sigmas[-1]), float(solver.scales[-1])
        cov = self.data_cov + sigma**2 * torch.eye(len(self.data_mean), dtype=torch.float64)
        return frechet_distance(samples, scale * self.data_mean, scale**2 * cov)

    def __call__(self, solver: Solver, lambdas: Tensor | None, batch: int) -> dict[str, float]:
        """Held-out RMSE and FD, and the RMSE on the first `batch` calibration seeds (those the λ were fitted on)."""
        self.runs.setdefault((float(solver.sigmas[0]), float(solver.sigmas[-1])), solver)
        with torch.no_grad():
            out = solver.sample(self.denoiser, self.noise, lambdas)
        exact, n = self.exact(solver), self.held_count
        fitted = slice(n, n + batch)
        return {"held_out": rmse(out[:n], exact[:n]), "calib": rmse(out[fitted], exact[fitted]), "fd": self.data_fd(solver, out[:n])}

    def reference_row(self, solver: Solver) -> dict[str, float]:
        """The reference itself: its FD to the data (the ∞-NFE limit of every sampler on this network)."""
        return {"fd": self.data_fd(solver, self.exact(solver)[: self.held_count])}


def reference_check(measure: Measure, reference: FineHeun, count: int) -> list[list[str]]:
    """Per reference (start σ, end σ): RMSE between the reference and the same ODE with half the steps on `count`
    seeds. Heun is second order, so the reference's own error is about a third of that."""
    rows = []
    coarse = FineHeun(reference.denoiser, reference.steps // 2, reference.sigma_min)
    for (sigma_start, sigma_end), solver in measure.runs.items():
        # The cache holds VE-form states at σ_end (before the solver's output scale), started as ExactStates does.
        states = measure.exact.cache[(sigma_start, sigma_end)]
        start = solver.init_state(measure.noise[:count]) / float(solver.scales[0])
        half = coarse.exact_endpoint(start, sigma_start, sigma_end=sigma_end)
        rows.append([f"{sigma_start:.4g} → {sigma_end:.4g}", str(reference.steps), f"{rmse(states[:count], half):.2e}", f"{float(states[:count].std()):.3f}"])
    return rows


def run(families: list[Family], nfes: list[int], measure: Measure, calib: Tensor) -> list[dict]:
    """All rows: per family, NFE and variant, the scores of `Measure` (one teacher run per family and NFE)."""
    rows = []
    for fam in families:
        schedule = fam.make_schedule()
        wanted = sorted(set(nfes) | {n for n in HEUN_EXTRA if fam.solver == "heun"})
        for nfe in nfes_for(fam, wanted):
            setup = SolverSetup.resolve(fam.solver, nfe, schedule)
            student = setup.build()
            teacher, indices = build_teacher(student, setup, SCALE, "aligned", PEER_TEACHER)
            targets = teacher_targets(teacher, indices, measure.denoiser, calib)
            for variant in VARIANTS:
                lambdas, dropped = calibrate(variant, student, measure.denoiser, calib, targets)
                row = {"family": fam.solver, "nfe": nfe, "variant": variant.label, "dropped": dropped,
                       "reference_fd": measure.reference_row(student)["fd"], **measure(student, lambdas, variant.batch)}
                rows.append(row)
            base = rows[-len(VARIANTS)]["held_out"]
            print(f"{fam.solver} NFE {nfe}: " + ", ".join(f"{r['variant']} {r['held_out']:.4f} ({r['held_out'] / base:.2f}×)" for r in rows[-len(VARIANTS):]), flush=True)
    return rows


def _base_of(rows: list[dict], row: dict) -> float:
    return next(r["held_out"] for r in rows if (r["family"], r["nfe"], r["variant"]) == (row["family"], row["nfe"], "base"))


def detail_table(rows: list[dict]) -> str:
    """Every run: held-out RMSE (× base), RMSE on its own calibration seeds, their ratio, FD, dropped stages."""
    lines = []
    for row in rows:
        base = _base_of(rows, row)
        lines.append([
            row["family"], str(row["nfe"]), row["variant"], f"{row['held_out']:.4f} ({row['held_out'] / base:.2f}×)",
            f"{row['calib']:.4f}", f"{row['held_out'] / row['calib']:.2f}", f"{row['fd']:.3f}", f"{row['reference_fd']:.3f}",
            ", ".join(map(str, row["dropped"])) or "—",
        ])
    header = ["family", "NFE", "variant", "held-out RMSE (× base)", "RMSE on its calib. seeds", "held-out / calib.", "FD", "reference FD", "guard dropped"]
    return markdown_table(header, lines)


def summary_table(rows: list[dict], variants: list[Variant]) -> str:
    """Held-out RMSE per family and NFE (rows) and variant (columns), the best D-variant in bold."""
    lines = []
    keys = sorted({(r["family"], r["nfe"]) for r in rows}, key=lambda k: ([r["family"] for r in rows].index(k[0]), k[1]))
    for fam, nfe in keys:
        values = {r["variant"]: r["held_out"] for r in rows if (r["family"], r["nfe"]) == (fam, nfe)}
        best = min((v for k, v in values.items() if k != "base"), default=None)
        lines.append([fam, str(nfe)] + [f"**{values[v.label]:.4f}**" if values[v.label] == best else f"{values[v.label]:.4f}" for v in variants])
    return markdown_table(["family", "NFE"] + [v.label for v in variants], lines)


def best_per_nfe(rows: list[dict], nfes: list[int]) -> str:
    """Per NFE and variant, the family with the smallest held-out RMSE."""
    lines = []
    for nfe in nfes:
        cells = [str(nfe)]
        for variant in VARIANTS:
            mine = [r for r in rows if r["nfe"] == nfe and r["variant"] == variant.label]
            if mine:
                best = min(mine, key=lambda r: r["held_out"])
                cells.append(f"{best['family']} {best['held_out']:.4f}")
        if len(cells) > 1:
            lines.append(cells)
    return markdown_table(["NFE"] + [f"best {v.label}" for v in VARIANTS], lines)


def plot(rows: list[dict], families: list[Family], path: Path) -> None:
    """One log–log panel per family: held-out RMSE of every variant against NFE."""

    def draw(ax, fam: Family) -> list[int]:
        for variant in VARIANTS:
            mine = [r for r in rows if r["family"] == fam.solver and r["variant"] == variant.label]
            ax.plot([r["nfe"] for r in mine], [r["held_out"] for r in mine], "o-", label=variant.label)
        return sorted({r["nfe"] for r in rows if r["family"] == fam.solver})

    family_panels(families, path, "RMSE to the network's ODE", draw)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--held-out", type=int, default=200, help="held-out seeds (RMSE and FD)")
    args_parser.add_argument("--families", default=",".join(FAMILY_NAMES), help="comma-separated solver names")
    args_parser.add_argument("--reference-steps", type=int, default=64, help="Heun steps of the reference ODE solution")
    args_parser.add_argument("--check-seeds", type=int, default=100, help="seeds for the reference's convergence check")
    args_parser.add_argument("--network", default=str(DIGITS_NET_PATH))
    args_parser.add_argument("--threads", type=int, default=2)
    args_parser.add_argument("--exact-model", action="store_true", help="run the same variants on the exact mixture instead")
    args = args_parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    families = [FAMILIES[name] for name in args.families.split(",")]
    nfes, held_out, steps = NFES, args.held_out, args.reference_steps
    if args.quick:
        families, nfes, held_out, steps = families[:1], [5], 100, 16
    calib, _ = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))
    test, _ = seeded_noise(range(HELD_OUT_START, HELD_OUT_START + held_out), (1, 8, 8))
    if args.exact_model:
        # The same variants on the exact mixture: its own DOP853 solution is the reference (batches of 100, as quality.py).
        denoiser = digits_mixture()
        measure = Measure(denoiser, denoiser, test, calib, digits_data()[0], chunk=100)
    else:
        denoiser = load_denoiser("edm_pickle", args.network).denoiser
        reference = FineHeun(denoiser, steps)
        measure = Measure(denoiser, reference, test, calib, digits_data()[0], chunk=len(test) + len(calib))
    rows = run(families, nfes, measure, calib)
    summary, detail, best = summary_table(rows, VARIANTS), detail_table(rows), best_per_nfe(rows, nfes)
    check = "" if args.exact_model else markdown_table(
        ["reference σ range", "Heun steps", "RMSE to half the steps", "std of the states"],
        reference_check(measure, reference, min(args.check_seeds, held_out)),
    )
    seconds = time.perf_counter() - start
    print(check, summary, best, detail, sep="\n\n")
    print(f"\n{seconds:.0f} s in all, {measure.exact.seconds:.0f} s of it for the reference states")
    out = output_dir(args)
    if out is None:
        return
    command = "PYTHONPATH=. python benchmarks/learned.py" + (" --quick" if args.quick else "") + (" --exact-model" if args.exact_model else "")
    if args.exact_model:
        text = f"""### The same variants on the exact model

`{command}` — {machine()}; {seconds:.0f} s wall. Same students, teacher, variants and seeds ({held_out} held-out),
on the exact digits mixture; RMSE to its exact ODE solution (DOP853), FD to the same 1797 training digits.

Held-out RMSE (best D-variant in bold):

{summary}

Best family per NFE (held-out RMSE):

{best}

All runs:

{detail}
"""
        write_section(out, "learned_exact", text)
        return
    plot(rows, families, figure_path(out, "learned_rmse"))
    text = f"""## Learned network

`{command}` — {machine()}; {seconds:.0f} s wall ({measure.exact.seconds:.0f} s of it for the reference states).

Model: `{args.network}`, a {sum(p.numel() for p in denoiser.parameters()):,}-parameter SongUNet inside
EDMPrecond trained on the same digits with the EDM loss (`benchmarks/train_digits_net.py`). Unlike the exact mixture
it has a score error, so here a correction fitted on the calibration batch can overfit. Students on the EDM Karras
grid ending at 0 (each family's default). Calibration: C = {SCALE}, `aligned` targets from a {PEER_TEACHER} teacher
(as `quality.py --peers`), closed form, |B| = 100 (seeds 0–99) or 10 (seeds 0–9, the most capacity only). Variants: `D` one λ per stage,
`h-all` history m = all earlier outputs, `blocks:2` one λ per 4×4 quarter of the image (the digits have one channel,
so per-channel λ is the scalar λ), `guard` 20 % of the calibration seeds held out (a stage whose λ does not lower
their loss keeps λ = 0). **held-out RMSE** ({held_out} seeds from {HELD_OUT_START:,}) and **RMSE on its calib.
seeds** (the seeds its λ were fitted on; all 100 for the base solver) are to the network's own probability-flow ODE
solution from the same latent (Heun, {steps} Karras steps, same start and end σ as the run); **FD** is the Fréchet
distance in pixel space of the held-out samples to the mean/covariance of the 1797 training digits; "reference FD"
is that of the reference ODE solutions, the limit every sampler approaches.

![RMSE vs NFE on the learned network](benchmarks/learned_rmse.png)

Reference convergence:

{check}

Held-out RMSE (best D-variant in bold):

{summary}

Best family per NFE (held-out RMSE):

{best}

All runs:

{detail}
"""
    write_section(out, "learned", text)


if __name__ == "__main__":
    main()
