"""Quality vs NFE on the exact digits mixture: every solver family × {base, D `paper`, D `aligned`} (Fig. 3/4 analogue).

Calibration: C = 10, |B| = 100 (seeds 0–99), closed-form λ. Evaluation on held-out seeds from 1,000,000: RMSE to the
exact ODE state where the run ends, and the Fréchet distance (pixel space) of the generated set to the exact marginal
there. Also: base solver at 5× each NFE (for "D at n ≈ base at 5n") and closed form vs Adam λ.
`--peers`: instead, every D-variant (history, groups, guard) against UniPC, DPM-Solver++, iPNDM and DEIS, each on
its best grid, on the EDM σ range (issue 12). `--fitted-grid`: fitted step positions (item 3c) for a few families,
base and D h-all on the fitted grid, against the same best peer.
Usage: PYTHONPATH=. python benchmarks/quality.py [--quick] [--peers | --fitted-grid] [--held-out 500] [--families ddim,euler] [--out-dir docs]
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
    family_panels,
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
    holdout_mask,
    rmse,
    seeded_noise,
    teacher_targets,
)
from dode_lightning.gmm import GaussianMixture, digits_mixture
from dode_lightning.joint_fit import JointFit, JointSettings
from dode_lightning.schedules import EDM
from dode_lightning.solvers import SOLVERS, LambdaLayout, NFEError, Solver

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

    def draw(ax, fam: Family) -> list[int]:
        mine = [r for r in rows if r["family"] == fam.solver]
        nfes = [r["nfe"] for r in mine]
        ax.plot(nfes, [r["base"][column] for r in mine], "o-", color="k", label="base")
        ax.plot(nfes, [r["paper"][column] for r in mine], "s--", color="tab:orange", label="D, paper targets")
        ax.plot(nfes, [r["aligned"][column] for r in mine], "^-", color="tab:blue", label="D, aligned targets")
        if column == 1:
            ax.plot(nfes, [r["fd_floor"] for r in mine], ":", color="grey", label="exact ODE (sample floor)")
        return nfes

    family_panels(families, path, ylabel, draw)


# ---- D-variants against the best training-free samplers, every method on its best grid (issue 12) ----

PEER_NFES = [4, 5, 6, 8, 10, 15]
PEERS = ["unipc_2", "unipc_3", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "ipndm", "deis_3"]
D_FAMILIES = ["euler", "unipc_2", "unipc_3", "dpm_solver_pp_3m", "ipndm", "deis_3"]
# (label, grid, keywords): EDM σ 80 → 0.002, ending in σ = 0 or at σ_min ("N + 1": no final jump to 0).
GRIDS = [
    ("Karras+0", "karras", {}),
    ("Karras N+1", "karras", {"terminal_zero": False}),
    ("log-SNR+0", "logsnr_uniform", {}),
    ("log-SNR N+1", "logsnr_uniform", {"terminal_zero": False}),
    ("time+0", "time_uniform", {}),
    ("time N+1", "time_uniform", {"terminal_zero": False}),
]
D_GRIDS = ["Karras+0", "Karras N+1", "log-SNR N+1"]
PEER_TEACHER = "unipc_3"
# (label, LambdaLayout history (0: all earlier outputs), groups, guard fraction)
VARIANTS = [
    ("D", 1, "none", 0.0),
    ("D+guard", 1, "none", 0.2),
    ("D h3", 3, "none", 0.0),
    ("D h-all", 0, "none", 0.0),
    ("D h-all+guard", 0, "none", 0.2),
    ("D h-all blocks:2", 0, "blocks:2", 0.0),
]


def _setup(name: str, nfe: int, grid: str, kwargs: dict) -> SolverSetup | None:
    try:
        setup = SolverSetup.resolve(name, nfe, EDM(), grid, **kwargs)
        setup.build()
    except (NFEError, ValueError):
        return None
    return setup


def versus_peers(measure: Measure, calib: Tensor, nfes: list[int], peers: list[str], families: list[str], variants: list) -> dict:
    """RMSE of every peer on every grid and of every D-variant on the D grids; teacher error and calibration cost."""
    grids = {label: (grid, kwargs) for label, grid, kwargs in GRIDS}
    base: dict[tuple[str, str, int], float] = {}
    for name in sorted(set(peers) | set(families)):
        for label, (grid, kwargs) in grids.items():
            for nfe in nfes:
                setup = _setup(name, nfe, grid, kwargs)
                if setup is not None:
                    base[(name, label, nfe)] = measure(setup.build(), fd=False)[0]
        print(f"base {name}: done", flush=True)
    d_rows: dict[tuple[str, str, str, int], tuple[float, list[int]]] = {}
    teacher_rows, costs = [], []
    for name in families:
        for label in D_GRIDS:
            grid, kwargs = grids[label]
            for nfe in nfes:
                setup = _setup(name, nfe, grid, kwargs)
                if setup is None:
                    continue
                student = setup.build()
                start = time.perf_counter()
                teacher, indices = build_teacher(student, setup, SCALE, "aligned", PEER_TEACHER)
                targets = teacher_targets(teacher, indices, measure.mixture, calib)
                teacher_seconds = time.perf_counter() - start
                if label == D_GRIDS[0] and nfe in (5, 10):
                    teacher_rows.append((name, nfe, teacher.nfe, measure(teacher, fd=False)[0], base[(name, label, nfe)]))
                for tag, history, groups, guard in variants:
                    layout = LambdaLayout(history or student.num_stages, groups)
                    holdout = holdout_mask(CALIBRATION_SEEDS, guard) if guard else None
                    start = time.perf_counter()
                    fit = fit_closed_form(student, measure.mixture, calib, targets, layout=layout, holdout=holdout)
                    fit_seconds = time.perf_counter() - start
                    d_rows[(name, label, tag, nfe)] = (measure(student, layout.expand(fit.lambdas, calib.shape[1:]), fd=False)[0], fit.dropped)
                    if label == D_GRIDS[0] and nfe == 10 and tag in ("D", "D h-all"):
                        floor = _evaluation_floor(teacher, student, measure.mixture, calib)
                        costs.append((name, tag, teacher_seconds, fit_seconds, floor))
            print(f"D {name} on {label}: done", flush=True)
    return {"base": base, "d": d_rows, "teachers": teacher_rows, "costs": costs}


def _evaluation_floor(teacher: Solver, student: Solver, mixture: GaussianMixture, calib: Tensor) -> float:
    """Seconds of the network evaluations calibration cannot avoid: the teacher run and one student run on |B|."""
    start = time.perf_counter()
    with torch.no_grad():
        teacher.sample(mixture, calib)
        student.sample(mixture, calib)
    return time.perf_counter() - start


def _best(values: dict, keys) -> tuple[float, str] | None:
    found = [(values[k], k) for k in keys if k in values]
    return min(found, key=lambda item: item[0]) if found else None


def peer_tables(result: dict, nfes: list[int], peers: list[str], families: list[str], variants: list) -> tuple[str, str, str, str, dict]:
    """Best peer vs best D per NFE; per family base vs D-variants; teachers; calibration cost. Also the plot data."""
    base, d_rows = result["base"], result["d"]
    tags = [v[0] for v in variants]
    summary, plot = [], {"peers": {}, "d": {}}
    for nfe in nfes:
        peer = _best(base, [(p, g, nfe) for p in peers for g, _, _ in GRIDS])
        d_best = _best({k: v[0] for k, v in d_rows.items()}, [(f, g, t, nfe) for f in families for g in D_GRIDS for t in tags])
        if peer is None or d_best is None:
            continue
        (p_err, (p_name, p_grid, _)), (d_err, (d_name, d_grid, d_tag, _)) = peer, d_best
        summary.append([str(nfe), f"{p_err:.4f} ({p_name}, {p_grid})", f"{d_err:.4f} ({d_tag} {d_name}, {d_grid})", f"{d_err / p_err:.2f}×"])
    for p in peers:
        plot["peers"][p] = [(n, _best(base, [(p, g, n) for g, _, _ in GRIDS])) for n in nfes]
    family_rows = []
    for f in families:
        for nfe in nfes:
            best_base = _best(base, [(f, g, nfe) for g in D_GRIDS])
            if best_base is None:
                continue
            b_err, (_, grid, _) = best_base
            cells = [f, str(nfe), f"{b_err:.4f} ({grid})"]
            for tag in tags:
                entry = d_rows.get((f, grid, tag, nfe))
                cells.append("—" if entry is None else f"{entry[0]:.4f} ({entry[0] / b_err:.2f}×)" + (f" drop {entry[1]}" if entry[1] else ""))
            family_rows.append(cells)
        plot["d"][f] = [(n, _best({k: v[0] for k, v in d_rows.items()}, [(f, g, t, n) for g in D_GRIDS for t in tags])) for n in nfes]
    summary_table = markdown_table(["NFE", "best training-free peer (grid)", "best D-variant (grid)", "D / peer"], summary)
    family_table = markdown_table(["family", "NFE", "base (its best D grid)", *tags], family_rows)
    teacher_table = markdown_table(
        ["student", "NFE", f"teacher ({PEER_TEACHER}) NFE", "teacher RMSE", "student base RMSE"],
        [[n, str(nfe), str(t_nfe), f"{t_err:.5f}", f"{b_err:.4f}"] for n, nfe, t_nfe, t_err, b_err in result["teachers"]],
    )
    cost_table = markdown_table(
        ["student (NFE 10)", "variant", "teacher (s)", "fit (s)", "evaluation floor (s)", "(teacher + fit) / floor"],
        [[n, tag, f"{t:.2f}", f"{fit:.3f}", f"{floor:.2f}", f"{(t + fit) / floor:.2f}"] for n, tag, t, fit, floor in result["costs"]],
    )
    return summary_table, family_table, teacher_table, cost_table, plot


def plot_peers(plot: dict, path) -> None:
    """Error vs NFE: every peer on its best grid per NFE (grey) and each family's best D-variant (colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, (name, points) in enumerate(plot["peers"].items()):
        xs = [n for n, best in points if best]
        ax.plot(xs, [best[0] for _, best in points if best], ls="--", marker="os^vD<"[i % 6], color=str(0.2 + 0.1 * i), label=f"{name} (best grid)")
    for name, points in plot["d"].items():
        xs = [n for n, best in points if best]
        ax.plot(xs, [best[0] for _, best in points if best], "-o", label=f"best D-{name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfes = sorted({n for points in plot["peers"].values() for n, _ in points})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to the exact ODE state")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peers_main(args, measure: Measure, calib: Tensor, start: float) -> None:
    """`--peers`: the comparison with the training-free samplers, its tables, plot and docs section."""
    if args.quick:
        nfes, peers, families, variants = [5, 10], ["unipc_2", "dpm_solver_pp_3m"], ["euler", "unipc_3"], VARIANTS[:1] + VARIANTS[3:4]
    else:
        nfes, peers, families, variants = PEER_NFES, PEERS, D_FAMILIES, VARIANTS
    result = versus_peers(measure, calib, nfes, peers, families, variants)
    summary, family, teachers, costs, plot = peer_tables(result, nfes, peers, families, variants)
    seconds = time.perf_counter() - start
    print(summary, family, teachers, costs, sep="\n\n")
    print(f"\n{seconds:.0f} s in all")
    out = output_dir(args)
    if out is None:
        return
    plot_peers(plot, figure_path(out, "quality_peers"))
    command = "PYTHONPATH=. python benchmarks/quality.py --peers" + (" --quick" if args.quick else "")
    text = f"""## D-variants against the best training-free samplers (issue 12)

`{command}` — {machine()}; {seconds:.0f} s wall.

Exact digits mixture, EDM σ 80 → 0.002, RMSE to the exact ODE state where the run ends (σ = 0, or σ_min for the
"N+1" grids that stop there) on {measure.rmse_count} held-out seeds. Calibration: seeds 0–99, C = {SCALE}, `aligned`
targets from a {PEER_TEACHER} teacher, closed form. Peers run on six grids (Karras ρ = 7, uniform log-SNR,
uniform σ; each ending in 0 or at σ_min) and count on the best one per NFE; D-variants on {", ".join(D_GRIDS)}.
Variants: `D` one λ per stage (the paper), `guard` 20 % of the calibration seeds held out (a stage whose λ does not
lower their loss keeps λ = 0; "drop [k]" lists those stages), `h3` / `h-all` history m = 3 / all earlier outputs,
`blocks:2` one λ per 4×4 quadrant.

![RMSE vs NFE, peers and D](benchmarks/quality_peers.png)

### Best peer vs best D-variant per NFE

{summary}

### Per family: base on its best grid (among the D grids) vs each D-variant on that grid

{family}

### Teacher error (Karras + 0 grid)

{teachers}

### Calibration cost (teacher + fit against the evaluation floor: teacher and student runs on |B| = 100)

{costs}
"""
    write_section(out, "quality_peers", text)


# ---- Fitted step positions (issue 12 item 3c) ----

FITTED_NFES = [4, 5, 6, 8, 10]
FITTED_FAMILIES = ["euler", "ipndm", "dpm_solver_pp_3m", "deis_3"]
# Fitted from both Karras grids (their endpoints stay); each family counts on the better of the two per column.
FITTED_FROM = ["Karras+0", "Karras N+1"]
# Joint-fit iterations (L-BFGS) for the σ-only fit and, with `--joint`, for σ and the D h-all λ together.
FIT_ITERATIONS = 30


def fitted_grids(measure: Measure, calib: Tensor, nfes: list[int], families: list[str], joint: bool) -> dict:
    """Per family, NFE and start grid: base on the Karras grid, on the fitted grid, and D h-all on each.

    The grid is fitted (`JointFit` with λ off, σ^{1/ρ} coordinate) to the unipc_3 teacher's endpoint (C = SCALE) on
    the calibration batch; the λ then get the usual `aligned` targets from the same teacher on the fitted grid;
    `joint` adds the joint fit of σ and those λ from there.
    """
    grids = {label: (grid, kwargs) for label, grid, kwargs in GRIDS}
    rows: dict[tuple[str, str, int], dict] = {}
    for name in families:
        for label in FITTED_FROM:
            for nfe in nfes:
                setup = _setup(name, nfe, *grids[label])
                if setup is None:
                    continue
                student = setup.build()
                start = time.perf_counter()
                teacher, indices = build_teacher(student, setup, SCALE, "aligned", PEER_TEACHER)
                endpoint = teacher_targets(teacher, indices[-1:], measure.mixture, calib)[0]
                zero = torch.zeros(student.num_stages, dtype=torch.float64)
                steps_only = JointSettings(coordinate="karras", fit_lambdas=False)
                fit = JointFit(name, student.sigmas, EDM(), measure.mixture, calib, endpoint, zero, LambdaLayout(), steps_only).fit(FIT_ITERATIONS)
                seconds = time.perf_counter() - start
                fitted = SOLVERS[name].from_grid(fit.sigmas, EDM())
                row = {"base": measure(student, fd=False)[0], "fitted": measure(fitted, fd=False)[0], "seconds": seconds,
                       "evaluations": fit.forward_runs, "sigmas": fit.sigmas}
                for tag, solver in (("d", student), ("fitted_d", fitted)):
                    teacher, indices = build_teacher(solver, setup, SCALE, "aligned", PEER_TEACHER)
                    targets = teacher_targets(teacher, indices, measure.mixture, calib)
                    layout = LambdaLayout(solver.num_stages)
                    closed = fit_closed_form(solver, measure.mixture, calib, targets, layout=layout)
                    row[tag] = measure(solver, layout.expand(closed.lambdas, calib.shape[1:]), fd=False)[0]
                if joint:
                    joint_start = time.perf_counter()
                    both = JointFit(name, fitted.sigmas, EDM(), measure.mixture, calib, targets[-1], closed.lambdas, layout, lambda_scale=closed.natural_scales())
                    result = both.fit(FIT_ITERATIONS)
                    row["joint_seconds"] = time.perf_counter() - joint_start
                    row["joint_d"] = measure(SOLVERS[name].from_grid(result.sigmas, EDM()), layout.expand(result.lambdas, calib.shape[1:]), fd=False)[0]
                rows[(name, label, nfe)] = row
                joint_note = f", joint σ + D h-all {row['joint_d']:.4f} ({row['joint_seconds']:.1f} s)" if "joint_d" in row else ""
                print(f"{name} {label} NFE {nfe}: base {row['base']:.4f} fitted {row['fitted']:.4f} D h-all {row['d']:.4f} "
                      f"fitted + D h-all {row['fitted_d']:.4f} ({seconds:.1f} s, {fit.forward_runs} runs){joint_note}", flush=True)
    return rows


def fitted_tables(peers: dict, rows: dict, nfes: list[int], families: list[str]) -> tuple[str, str]:
    """Best peer vs the best fitted-grid variant per NFE; per family the columns, each on its better start grid."""
    columns = [("base", "base (Karras)"), ("d", "D h-all (Karras)"), ("fitted", "fitted grid"), ("fitted_d", "fitted grid + D h-all")]
    if any("joint_d" in row for row in rows.values()):
        columns.append(("joint_d", "joint σ + D h-all"))
    summary, family_rows = [], []
    for nfe in nfes:
        peer = _best(peers, [(p, g, nfe) for p in PEERS for g, _, _ in GRIDS])
        cells = [str(nfe), "—" if peer is None else f"{peer[0]:.4f} ({peer[1][0]}, {peer[1][1]})"]
        for column, _ in columns[1:]:
            best = _best({k: v[column] for k, v in rows.items() if column in v}, [(f, g, nfe) for f in families for g in FITTED_FROM])
            cells.append("—" if best is None or peer is None else f"{best[0]:.4f} ({best[1][0]}, {best[1][1]}): {best[0] / peer[0]:.2f}×")
        summary.append(cells)
    for name in families:
        for nfe in nfes:
            cells = [name, str(nfe)]
            for column, _ in columns:
                best = _best({k: v[column] for k, v in rows.items() if column in v}, [(name, g, nfe) for g in FITTED_FROM])
                cells.append("—" if best is None else f"{best[0]:.4f} ({best[1][1]})")
            start = [rows[(name, g, nfe)] for g in FITTED_FROM if (name, g, nfe) in rows]
            cells.append(f"{max(r['seconds'] for r in start):.1f} s / {max(r['evaluations'] for r in start)}" if start else "—")
            family_rows.append(cells)
    summary_table = markdown_table(["NFE", "best training-free peer (grid)", *[f"best {label} / peer" for _, label in columns[1:]]], summary)
    family_table = markdown_table(["family", "NFE", *[label for _, label in columns], "grid fit (teacher + fit) / student runs"], family_rows)
    return summary_table, family_table


def fitted_main(args, measure: Measure, calib: Tensor, start: float) -> None:
    """`--fitted-grid`: fitted step positions against the best training-free peer, its tables and docs section."""
    nfes, families = ([5], ["euler", "ipndm"]) if args.quick else (FITTED_NFES, FITTED_FAMILIES)
    peers = versus_peers(measure, calib, nfes, PEERS, [], [])["base"]
    rows = fitted_grids(measure, calib, nfes, families, args.joint)
    summary, family = fitted_tables(peers, rows, nfes, families)
    seconds = time.perf_counter() - start
    print(summary, family, sep="\n\n")
    print(f"\n{seconds:.0f} s in all")
    out = output_dir(args)
    if out is None:
        return
    command = "PYTHONPATH=. python benchmarks/quality.py --fitted-grid" + (" --joint" if args.joint else "") + (" --quick" if args.quick else "") + f" --held-out {measure.rmse_count}"
    text = f"""## Fitted step positions (issue 12 item 3c)

`{command}` — {machine()}; {seconds:.0f} s wall.

Exact digits mixture, EDM σ 80 → 0.002, RMSE to the exact ODE state where the run ends on {measure.rmse_count} held-out
seeds. `dode_lightning.joint_fit` with λ off: the σ of the student's grid (σ_max and the end fixed; on a grid
ending in 0 the last positive σ moves too) are spread by softmax increments in u = σ^(1/7), monotone by
construction, and fitted by backpropagation through the student ({FIT_ITERATIONS} L-BFGS iterations) to the final
state of a {PEER_TEACHER} teacher at C = {SCALE} on the calibration seeds 0–99; then the closed-form `h-all` λ fit
(aligned targets from the same teacher) runs on the fitted grid. Each family is fitted from the Karras+0 and the
Karras N+1 grid and counts on the better one. "joint σ + D h-all" (`--joint`): from there, σ and the h-all λ
fitted together end to end ({FIT_ITERATIONS} L-BFGS iterations, `model.fit: joint`). Peers: as in the section
"D-variants against the best training-free samplers" (best of six grids per NFE).

### Best peer vs the best fitted-grid variant per NFE (families {", ".join(families)})

{summary}

### Per family (each column on its better start grid)

{family}
"""
    write_section(out, "quality_fitted_grid", text)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--held-out", type=int, default=500, help="seeds for the RMSE (exact ODE states)")
    args_parser.add_argument("--fd-samples", type=int, default=2000, help="seeds for the Fréchet distance (≥ --held-out)")
    args_parser.add_argument("--families", default=None, help="comma-separated solver names (default: all nine)")
    args_parser.add_argument("--adam-nfe", default="5,10", help="NFEs at which Adam is compared with the closed form")
    args_parser.add_argument("--adam-steps", type=int, default=300)
    args_parser.add_argument("--peers", action="store_true", help="only the comparison with UniPC, DPM-Solver++, iPNDM, DEIS on their best grids")
    args_parser.add_argument("--fitted-grid", action="store_true", help="only fitted step positions (base and D h-all) against the best peer")
    args_parser.add_argument("--joint", action="store_true", help="with --fitted-grid: also the joint fit of σ and the D h-all λ from the fitted grid")
    args = args_parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.peers or args.fitted_grid:
        held_out = 100 if args.quick else args.held_out
        test = seeded_noise(range(HELD_OUT_START, HELD_OUT_START + held_out), (1, 8, 8))[0]
        run = fitted_main if args.fitted_grid else peers_main
        run(args, Measure(digits_mixture(), test, held_out), seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))[0], start)
        return
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
