"""Quality vs NFE on the exact digits mixture: every solver family × {base, D `paper`, D `aligned`} (Fig. 3/4 analogue).

Calibration: C = 10, |B| = 100 (seeds 0–99), closed-form λ. Evaluation on held-out seeds from 1,000,000: RMSE to the
exact ODE state where the run ends, and the Fréchet distance (pixel space) of the generated set to the exact marginal
there. Also: base solver at 5× each NFE (for "D at n ≈ base at 5n") and closed form vs Adam λ.
Usage: PYTHONPATH=. python benchmarks/quality.py [--quick] [--held-out 500] [--families ddim,euler] [--out-dir docs]
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmarks.common import (
    CALIBRATION_SEEDS,
    FAMILIES,
    HELD_OUT_START,
    SCALE,
    ExactStates,
    Family,
    adam_lambdas,
    exact_fd,
    family,
    figure_path,
    machine,
    markdown_table,
    output_dir,
    parser,
    write_section,
)
from dode_lightning.distill import (
    SolverSetup,
    build_teacher,
    evaluate_lambdas,
    fit_closed_form,
    rmse,
    seeded_noise,
    teacher_targets,
)
from dode_lightning.gmm import GaussianMixture, digits_mixture
from dode_lightning.solvers import NFEError, Solver

NFES = [3, 4, 5, 6, 8, 10, 15, 25, 50]
# EDM's Heun makes 2N − 1 evaluations: only odd NFE exist; the paper's Heun grid adds 9 and 49.
HEUN_EXTRA = [9, 49]
MODES = ("paper", "aligned")


class Measure:
    """RMSE to the exact ODE states on the first `rmse_count` held-out seeds; Fréchet distance on all of them."""

    def __init__(self, mixture: GaussianMixture, held_out: Tensor, rmse_count: int) -> None:
        self.mixture, self.held_out, self.rmse_count = mixture, held_out, rmse_count
        self.exact = ExactStates(mixture, held_out[:rmse_count])
        self.floors: dict[tuple[float, float], float] = {}

    def __call__(self, solver: Solver, lambdas: Tensor | None = None, fd: bool = True) -> tuple[float, float | None]:
        noise = self.held_out if fd else self.held_out[: self.rmse_count]
        out = solver.sample(self.mixture, noise, lambdas)
        error = rmse(out[: self.rmse_count], self.exact(solver))
        return error, exact_fd(self.mixture, solver, out) if fd else None

    def floor(self, solver: Solver) -> float:
        """FD of as many exact samples of the same marginal: the finite-sample floor of the FD column."""
        sigma, scale = float(solver.sigmas[-1]), float(solver.scales[-1])
        if (sigma, scale) not in self.floors:
            generator = torch.Generator().manual_seed(0)
            exact = self.mixture.sample(len(self.held_out), generator)
            exact = scale * (exact + sigma * torch.randn(exact.shape, dtype=torch.float64, generator=generator))
            self.floors[(sigma, scale)] = exact_fd(self.mixture, solver, exact)
        return self.floors[(sigma, scale)]


def nfes_for(fam: Family, nfes: list[int]) -> list[int]:
    """The NFEs of the grid this family can realise (plus the paper's odd Heun points)."""
    if fam.solver == "heun":
        nfes = sorted({n for n in nfes if n % 2} | {n for n in HEUN_EXTRA if min(nfes) <= n <= max(nfes)})
    schedule = fam.make_schedule()
    usable = []
    for nfe in nfes:
        try:
            SolverSetup.resolve(fam.solver, nfe, schedule).build()
        except NFEError:
            continue
        usable.append(nfe)
    return usable


def run_family(fam: Family, nfes: list[int], measure: Measure, calib: Tensor, adam_nfes: list[int], adam_steps: int) -> tuple[list[dict], list[dict]]:
    """All rows of one family: base / D paper / D aligned per NFE, base at 5×NFE, and the Adam comparisons."""
    schedule = fam.make_schedule()
    rows, adam_rows = [], []
    for nfe in nfes:
        setup = SolverSetup.resolve(fam.solver, nfe, schedule)
        student = setup.build()
        row = {"family": fam.solver, "nfe": nfe, "base": measure(student), "fd_floor": measure.floor(student)}
        try:
            row["base_5x"] = measure(SolverSetup.resolve(fam.solver, 5 * nfe, schedule).build(), fd=False)[0]
        except NFEError:
            row["base_5x"] = None
        for mode in MODES:
            teacher, indices = build_teacher(student, setup, SCALE, mode)
            targets = teacher_targets(teacher, indices, measure.mixture, calib)
            fit = fit_closed_form(student, measure.mixture, calib, targets)
            row[mode] = measure(student, fit.lambdas)
            row[f"{mode}_teacher_nfe"] = teacher.nfe
            if mode == "aligned" and nfe in adam_nfes:
                start = time.perf_counter()
                lambdas = adam_lambdas(student, measure.mixture, calib, targets, adam_steps, 0.1)
                adam_seconds = time.perf_counter() - start
                adam = evaluate_lambdas(student, measure.mixture, calib, targets, lambdas)
                adam_rows.append(
                    {
                        "family": fam.solver, "nfe": nfe, "closed_loss": float(fit.loss_fit.sum()), "adam_loss": float(adam.loss_fit.sum()),
                        "closed": row["aligned"][0], "adam": measure(student, lambdas, fd=False)[0], "seconds": adam_seconds,
                        "max_dlambda": _largest_change(lambdas, fit.lambdas, student.lambda_fitted),
                    }
                )
        rows.append(row)
        print("| " + " | ".join(_row_cells(row)) + " |", flush=True)
    return rows, adam_rows


def _largest_change(lambdas: Tensor, reference: Tensor, fitted: list[bool]) -> str:
    """max_k |λ_k − λ*_k| over the stages that carry a free λ, and that stage."""
    change = (lambdas - reference).abs() * torch.tensor(fitted, dtype=torch.float64)
    stage = int(change.argmax())
    return f"{float(change[stage]):.2g} (stage {stage} of {len(fitted)})"


def _ratio(value: float, base: float) -> str:
    return f"{value:.4f} ({value / base:.2f}×)"


def _row_cells(row: dict) -> list[str]:
    base_rmse, base_fd = row["base"]
    cells = [row["family"], str(row["nfe"]), f"{base_rmse:.4f}"]
    cells += [_ratio(row[mode][0], base_rmse) for mode in MODES]
    cells.append("—" if row["base_5x"] is None else f"{row['base_5x']:.4f}")
    cells += [f"{base_fd:.3f}"] + [f"{row[mode][1]:.3f}" for mode in MODES] + [f"{row['fd_floor']:.3f}"]
    return cells


def match_table(rows: list[dict], families: list[Family]) -> str:
    """Per family and mode, the smallest NFE n whose D-variant RMSE is ≤ the base solver's at 5n."""
    cells = []
    for fam in families:
        mine = [r for r in rows if r["family"] == fam.solver and r["base_5x"] is not None]
        line = [fam.solver]
        for mode in MODES:
            hits = [r for r in mine if r[mode][0] <= r["base_5x"]]
            if hits:
                hit = min(hits, key=lambda r: r["nfe"])
                line.append(f"{hit['nfe']} ({hit[mode][0]:.4f} ≤ {hit['base_5x']:.4f} at {5 * hit['nfe']})")
            else:
                line.append("none of " + ", ".join(str(r["nfe"]) for r in mine))
        cells.append(line)
    return markdown_table(["family", "D `paper` at n ≤ base at 5n", "D `aligned` at n ≤ base at 5n"], cells)


def plot(rows: list[dict], families: list[Family], path, column: int, ylabel: str) -> None:
    """One log–log panel per family: base, D paper and D aligned against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cols = 3
    nrows = -(-len(families) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        mine = [r for r in rows if r["family"] == fam.solver]
        nfes = [r["nfe"] for r in mine]
        ax.plot(nfes, [r["base"][column] for r in mine], "o-", color="k", label="base")
        ax.plot(nfes, [r["paper"][column] for r in mine], "s--", color="tab:orange", label="D, paper targets")
        ax.plot(nfes, [r["aligned"][column] for r in mine], "^-", color="tab:blue", label="D, aligned targets")
        if column == 1:
            ax.plot(nfes, [r["fd_floor"] for r in mine], ":", color="grey", label="exact ODE (sample floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(fam.label, fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--held-out", type=int, default=500, help="seeds for the RMSE (exact ODE states)")
    args_parser.add_argument("--fd-samples", type=int, default=2000, help="seeds for the Fréchet distance (≥ --held-out)")
    args_parser.add_argument("--families", default=None, help="comma-separated solver names (default: all nine)")
    args_parser.add_argument("--adam-nfe", default="5,10", help="NFEs at which Adam is compared with the closed form")
    args_parser.add_argument("--adam-steps", type=int, default=300)
    args = args_parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        families, nfes, held_out, fd_samples = [family("euler"), family("dpm_solver_3")], [5, 10], 100, 200
    else:
        families, nfes, held_out, fd_samples = FAMILIES, NFES, args.held_out, max(args.fd_samples, args.held_out)
    adam_steps = args.adam_steps
    if args.families:
        families = [family(name) for name in args.families.split(",")]
    adam_nfes = [int(n) for n in args.adam_nfe.split(",") if n]
    mixture = digits_mixture()
    calib, _ = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))
    test, _ = seeded_noise(range(HELD_OUT_START, HELD_OUT_START + fd_samples), (1, 8, 8))
    measure = Measure(mixture, test, held_out)
    header = ["family", "NFE", "base RMSE", "D `paper` RMSE", "D `aligned` RMSE", "base RMSE at 5×NFE", "base FD", "D `paper` FD", "D `aligned` FD", "FD floor"]
    print("| " + " | ".join(header) + " |", flush=True)
    rows, adam_rows = [], []
    for fam in families:
        fam_rows, fam_adam = run_family(fam, nfes_for(fam, nfes), measure, calib, adam_nfes, adam_steps)
        rows += fam_rows
        adam_rows += fam_adam
    quality = markdown_table(header, [_row_cells(r) for r in rows])
    matches = match_table(rows, families)
    adam = markdown_table(
        ["family", "NFE", "calib. loss, closed form", "calib. loss, Adam", "held-out RMSE, closed form", "held-out RMSE, Adam", "max |λ_Adam − λ_closed|", "Adam time (s)"],
        [
            [r["family"], str(r["nfe"]), f"{r['closed_loss']:.3e}", f"{r['adam_loss']:.3e}", f"{r['closed']:.4f}", f"{r['adam']:.4f}", r["max_dlambda"], f"{r['seconds']:.1f}"]
            for r in adam_rows
        ],
    )
    seconds = time.perf_counter() - start
    print(quality, matches, adam, sep="\n\n")
    print(f"\n{seconds:.0f} s in all, {measure.exact.seconds:.0f} s of it for the exact reference states")
    out = output_dir(args)
    if out is None:
        return
    plot(rows, families, figure_path(out, "quality_rmse"), 0, "RMSE to exact ODE state")
    plot(rows, families, figure_path(out, "quality_fd"), 1, "Fréchet distance (pixels)")
    command = "PYTHONPATH=. python benchmarks/quality.py" + (" --quick" if args.quick else "")
    text = f"""## Quality vs NFE on the exact model (Fig. 3/4 analogue)

`{command}` — {machine()}; {seconds:.0f} s wall ({measure.exact.seconds:.0f} s of it computing exact reference states).

Model: the exact digits mixture (10 full-covariance Gaussians on 8×8, unconditional). Calibration: C = {SCALE},
|B| = 100 (seeds 0–99), closed-form λ; evaluation on held-out seeds from {HELD_OUT_START:,}. **RMSE** (first
{held_out} held-out seeds) is to the exact probability-flow ODE state where the run ends, from the same latent (σ = 0,
or σ(t = 0) ≈ 0.01 for iPNDM, DPM-Solver and DEIS, whose grids end there). **FD** ({fd_samples} held-out seeds) is the
Fréchet distance in pixel space (64-d) between the generated set's mean/covariance and the exact mean/covariance of
the ODE's marginal at that σ (known in closed form for the mixture, so only the generated side is estimated). The
"FD floor" is the same statistic for {fd_samples} exact samples of that marginal: differences below it are
finite-sample noise. Ratios are D / base. Heun realises only odd NFE (2N − 1): its rows are the odd grid
points plus the paper's 9 and 49. "base RMSE at 5×NFE" is the base solver with five times the evaluations.

![RMSE vs NFE](benchmarks/quality_rmse.png)

![FD vs NFE](benchmarks/quality_fd.png)

{quality}

### Smallest NFE n at which the D-variant matches the base solver at 5n (held-out RMSE)

{matches}

### Closed form vs Adam λ (`aligned` targets)

Adam as in `DODECalibration`: {adam_steps} full-batch steps, lr 0.1, on θ with λ_k = c_k·θ_k (c_k = natural scale at
λ = 0). The calibration loss is the sum over stages of the per-stage mean squared error to the targets.

{adam}
"""
    write_section(out, "quality", text)


if __name__ == "__main__":
    main()
