"""Shared helpers of the benchmark scripts: solver families, exact reference states, distances, timing, output.

Every benchmark prints its Markdown table and, for a full run, replaces its own section of docs/benchmarks.md
(between `<!-- begin NAME -->` and `<!-- end NAME -->`) and writes its PNGs next to it under docs/benchmarks/.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from dode_lightning.denoisers import Denoiser, ve_form
from dode_lightning.distill import evaluate_lambdas, stagewise_losses
from dode_lightning.gmm import GaussianMixture
from dode_lightning.schedules import Schedule, make_schedule
from dode_lightning.solvers import Solver

# checkpoints.md §8: edm-ffhq-64x64-uncond-vp, init kwargs in train.py order (num_blocks/attn_resolutions absent).
FFHQ_DDPMPP = dict(
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[1, 2, 2, 2], augment_dim=9,
    dropout=0.05, use_fp16=False, img_resolution=64, img_channels=3, label_dim=0,
)

CALIBRATION_SEEDS = range(100)
HELD_OUT_START = 1_000_000
SCALE = 10


@dataclass(frozen=True)
class Family:
    """A solver family as benchmarked: registry name, schedule, and how the tables label it."""

    solver: str
    schedule: str
    label: str

    def make_schedule(self) -> Schedule:
        return make_schedule(self.schedule)


FAMILIES = [
    Family("ddim", "vp_linear", "DDIM-ε (VP linear, uniform_torch grid)"),
    Family("euler", "edm", "Euler-x₀ = EDM DDIM (Karras)"),
    Family("heun", "edm", "Heun = EDM (Karras)"),
    Family("ipndm", "vp_linear", "iPNDM (VP linear, int-linspace grid)"),
    Family("dpm_solver_2", "vp_linear", "DPM-Solver-2 (VP linear, time-uniform)"),
    Family("dpm_solver_3", "vp_linear", "DPM-Solver-3 (VP linear, time-uniform)"),
    Family("dpm_solver_pp_2m", "edm", "DPM-Solver++ 2M (Karras)"),
    Family("dpm_solver_pp_3m", "edm", "DPM-Solver++ 3M (Karras)"),
    Family("deis_3", "vp_linear", "DEIS-3 (tAB, VP linear, int-linspace grid)"),
]


def family(name: str) -> Family:
    """The benchmarked family with this solver name."""
    for candidate in FAMILIES:
        if candidate.solver == name:
            return candidate
    raise ValueError(f"unknown family {name!r}; choose one of {', '.join(f.solver for f in FAMILIES)}")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares: --quick and --out-dir."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes); writes nothing unless --out-dir is given")
    result.add_argument("--out-dir", default=None, help="where benchmarks.md and the PNGs go (default: docs/ for a full run)")
    return result


def output_dir(args: argparse.Namespace) -> Path | None:
    """docs/ for a full run, nothing for --quick, or the explicit --out-dir (created here, before the run, so that a
    long measurement does not end in a folder that is not there)."""
    if args.out_dir is not None:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out
    return None if args.quick else Path("docs")


def machine() -> str:
    """One line naming the machine a measurement ran on."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work), "
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (a '|' inside a cell is escaped)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def write_section(out_dir: Path, name: str, text: str) -> Path:
    """Replace (or append) the `name` section of out_dir/benchmarks.md, leaving hand-written text alone."""
    path = out_dir / "benchmarks.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)
    return path


def print_and_write_section(args: argparse.Namespace, name: str, text: str) -> None:
    """Print a benchmark's Markdown report and, for a full run (or --out-dir), replace its `name` section of
    benchmarks.md."""
    print(text)
    out = output_dir(args)
    if out is not None:
        print(f"wrote {write_section(out, name, text)}")


def print_and_write(text: str, out: Path | None) -> None:
    """Print a benchmark's Markdown report and, for a full run, write it to its own file under docs/."""
    print("\n" + text)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")


def figure_path(out_dir: Path, name: str) -> Path:
    """docs/benchmarks/<name>.png (created folder); link it from benchmarks.md as benchmarks/<name>.png."""
    folder = out_dir / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"


def family_panels(families: list[Family], path: Path, ylabel: str, draw: Callable[[object, Family], list[int]]) -> None:
    """One log–log panel per family (3 per row): `draw(ax, family)` plots its lines and returns the NFE ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cols = 3
    nrows = -(-len(families) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        nfes = draw(ax, fam)
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


def median_cpu_time(run: Callable[[], object], repeats: int) -> float:
    """Median CPU time of `repeats` calls, in seconds (after one untimed warm-up call).

    CPU time of this process rather than wall time: with one torch thread the two agree on an idle machine, and
    CPU time stays meaningful when other jobs share the cores (wall time then measures the neighbours).
    """
    run()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def paired_cpu_times(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median CPU times of two calls measured alternately (after one warm-up of each), so drifts in machine load
    hit both alike."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, bucket in ((first, times[0]), (second, times[1])):
            start = time.process_time()
            run()
            bucket.append(time.process_time() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def adam_lambdas(student: Solver, denoiser: Denoiser, noise: Tensor, targets: Tensor, steps: int, lr: float) -> Tensor:
    """Adam on the per-stage objective, parametrised as DODECalibration does: λ_k = c_k·θ_k, c_k = natural scale at λ = 0."""
    at_zero = evaluate_lambdas(student, denoiser, noise, targets, torch.zeros(student.num_stages, dtype=torch.float64))
    scale = at_zero.natural_scales()
    theta = torch.zeros(student.num_stages, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        stagewise_losses(student, denoiser, noise, targets, theta * scale).sum().backward()
        optimizer.step()
    return (theta * scale).detach()


class ReferenceODE(Protocol):
    """Anything that solves the probability-flow ODE accurately from a VE-form state (the mixture's exact solution,
    or a fine solver run on a network)."""

    def exact_endpoint(self, x: Tensor, sigma_start: float, *, sigma_end: float = 0.0) -> Tensor: ...


class ExactStates:
    """Exact ODE states where each solver run ends, computed once per (start σ, end σ) and reused.

    A run starts at solver.init_state(noise) (VE form: divided by the state scale s₀) and ends at σ_end, in the
    solver's own scaled form s_end·x(σ_end) (DPM-Solver, iPNDM and DEIS end at t = 0, σ ≈ 0.01, not at σ = 0); the
    unconditional mixture has no closed form, so `exact_endpoint` integrates (DOP853).
    Batches of `chunk` keep DOP853's step count driven by few samples (faster than one big system).
    """

    def __init__(self, mixture: ReferenceODE, noise: Tensor, chunk: int = 100) -> None:
        self.mixture, self.noise, self.chunk = mixture, noise, chunk
        self.cache: dict[tuple[float, float], Tensor] = {}
        self.seconds = 0.0

    def __call__(self, solver: Solver) -> Tensor:
        sigma_start, sigma_end = float(solver.sigmas[0]), float(solver.sigmas[-1])
        key = (sigma_start, sigma_end)
        if key not in self.cache:
            start = time.perf_counter()
            x = ve_form(solver.init_state(self.noise), solver.sigmas[0], solver.scales[0])
            parts = [self.mixture.exact_endpoint(chunk, sigma_start, sigma_end=sigma_end) for chunk in torch.split(x, self.chunk)]
            self.cache[key] = torch.cat(parts)
            self.seconds += time.perf_counter() - start
        return self.cache[key] * float(solver.scales[-1])


def mixture_moments(mixture: GaussianMixture, sigma: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact mean and covariance of s·(x₀ + σn), x₀ from the mixture: the ODE's marginal at σ (flattened, float64)."""
    weights = mixture.log_weights.exp()
    mean = weights @ mixture.means
    second = torch.einsum("k,kde->de", weights, mixture.covariances + torch.einsum("kd,ke->kde", mixture.means, mixture.means))
    cov = second - torch.outer(mean, mean) + sigma**2 * torch.eye(len(mean), dtype=torch.float64)
    return scale * mean, scale**2 * cov


def frechet_distance(samples: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Fréchet (2-Wasserstein between Gaussians) distance in pixel space of the samples' moments to (mean, cov)."""
    flat = samples.reshape(len(samples), -1).to(torch.float64)
    mu = flat.mean(0)
    sample_cov = torch.cov(flat.T)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root @ sample_cov @ root).clamp(min=0).sqrt().sum()
    return float(((mu - mean) ** 2).sum() + torch.trace(sample_cov) + torch.trace(cov) - 2 * cross)


def exact_fd(mixture: GaussianMixture, solver: Solver, samples: Tensor) -> float:
    """Fréchet distance of a run's final states to the exact marginal at the σ where that run ends."""
    sigma_end, scale_end = float(solver.sigmas[-1]), float(solver.scales[-1])
    return frechet_distance(samples, *mixture_moments(mixture, sigma_end, scale_end))


def peak_rss_growth(run: Callable[[], object]) -> tuple[object, float]:
    """Run and return (result, peak resident-memory growth in MiB): VmHWM is reset first via /proc/self/clear_refs."""

    def status(field: str) -> float:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    result = run()
    return result, status("VmHWM") - before
