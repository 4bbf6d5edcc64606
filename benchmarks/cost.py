"""Calibration cost (Table 1 analogue): teacher + fit wall time in units of sampling as many images with 10-step DDIM.

Three parts. (1) Exact digits mixture, every family at NFE 10 (Heun 9), C = 10, |B| = 100, both target modes:
teacher and closed-form fit times against the floor (teacher NFE + student NFE)/10 evaluations-worth, plus the
Adam fit. (2) The same for a small DDPM++ network (random weights), where the network dominates. (3) Peak memory of
the teacher cache at FFHQ-64 size (3×64×64, |B| = 100, float64, analytic Gaussian denoiser) against K·|B|·D, each
case in a fresh process.
Usage: PYTHONPATH=. python benchmarks/cost.py [--quick] [--out-dir docs]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import (
    CALIBRATION_SEEDS,
    FAMILIES,
    SCALE,
    Family,
    adam_lambdas,
    family,
    machine,
    markdown_table,
    median_cpu_time,
    output_dir,
    parser,
    peak_rss_growth,
    write_section,
)
from dode_lightning.denoisers import Denoiser
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, seeded_noise, teacher_targets
from dode_lightning.gmm import digits_mixture
from dode_lightning.networks import EDMPrecond

SMALL_DDPMPP = dict(
    model_type="SongUNet", img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], dropout=0.0,
)
MEMORY_CASES = [("euler", 10), ("heun", 9), ("dpm_solver_3", 10)]
FFHQ_SHAPE = (3, 64, 64)


def unit_nfe(fam: Family) -> int:
    """NFE of the family's base solver that comes closest to 10 (Heun: 9 or 11 → 9)."""
    return 9 if fam.solver == "heun" else 10


def ddim_unit(fam: Family) -> str:
    """The '10-step DDIM' of the family's side: noise-prediction DDIM on VP, Euler (= EDM DDIM) on EDM."""
    return "ddim" if fam.schedule.startswith("vp") else "euler"


def calibration_row(fam: Family, mode: str, denoiser: Denoiser, noise: Tensor, repeats: int, adam_steps: int) -> dict:
    """Times of one calibration: 10-step DDIM sampling (the unit), teacher run, closed-form fit, Adam fit."""
    schedule = fam.make_schedule()
    setup = SolverSetup.resolve(fam.solver, unit_nfe(fam), schedule)
    student = setup.build()
    unit_solver = SolverSetup.resolve(ddim_unit(fam), 10, schedule).build()
    teacher, indices = build_teacher(student, setup, SCALE, mode)
    with torch.no_grad():
        unit = median_cpu_time(lambda: unit_solver.sample(denoiser, noise), repeats)
        d_sample = median_cpu_time(lambda: student.sample(denoiser, noise, torch.zeros(student.num_stages, dtype=torch.float64)), repeats)
        teacher_s = median_cpu_time(lambda: teacher_targets(teacher, indices, denoiser, noise), repeats)
        targets = teacher_targets(teacher, indices, denoiser, noise)
        fit_s = median_cpu_time(lambda: fit_closed_form(student, denoiser, noise, targets), repeats)
    adam_s = None
    if adam_steps:
        start = time.process_time()
        adam_lambdas(student, denoiser, noise, targets, adam_steps, 0.1)
        adam_s = time.process_time() - start
    return {
        "family": fam.solver, "mode": mode, "nfe": student.nfe, "teacher_nfe": teacher.nfe, "unit": unit, "teacher": teacher_s,
        "fit": fit_s, "adam": adam_s, "adam_steps": adam_steps, "d_sample": d_sample, "batch": len(noise),
    }


def calibration_cells(row: dict) -> list[str]:
    unit = row["unit"]
    total = (row["teacher"] + row["fit"]) / unit
    floor = (row["teacher_nfe"] + row["nfe"]) / 10
    # Table 1's "total": calibration once, then 50k samples with the D-solver; unit = 50k samples with 10-step DDIM.
    table1 = total * row["batch"] / 50_000 + row["d_sample"] / unit
    cells = [
        row["family"], row["mode"], str(row["nfe"]), str(row["teacher_nfe"]), f"{unit * 1e3:.1f} ms",
        f"{row['teacher'] / unit:.2f}", f"{row['fit'] / unit:.2f}", f"{total:.2f}", f"{floor:.1f}", f"{total / floor:.2f}",
    ]
    cells.append("—" if row["adam"] is None else f"{row['adam'] / unit:.0f} ({row['adam_steps']} steps)")
    cells.append(f"{table1:.3f}")
    return cells


CALIBRATION_HEADER = [
    "family", "targets", "NFE", "teacher NFE", "unit: 10-step DDIM, |B| images", "teacher (units)", "fit (units)", "teacher + fit",
    "floor (teacher NFE + NFE)/10", "measured / floor", "Adam fit (units)", "Table-1 total for 50k samples",
]


def gaussian_denoiser(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
    """Exact denoiser of N(0, I) data: D(x; σ) = x / (1 + σ²); a stand-in that costs almost nothing."""
    return x / (1.0 + torch.as_tensor(sigma, dtype=x.dtype) ** 2)


def memory_child(name: str, nfe: int) -> dict:
    """Runs in a fresh interpreter: peak RSS growth of teacher_targets at FFHQ-64 size, |B| = 100, float64."""
    fam = family(name)
    setup = SolverSetup.resolve(name, nfe, fam.make_schedule())
    student = setup.build()
    teacher, indices = build_teacher(student, setup, SCALE, "aligned")
    noise = torch.randn(100, *FFHQ_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets, growth = peak_rss_growth(lambda: teacher_targets(teacher, indices, gaussian_denoiser, noise))
    _, fit_growth = peak_rss_growth(lambda: fit_closed_form(student, gaussian_denoiser, noise, targets))
    state_mib = noise.numel() * noise.element_size() / 2**20
    return {
        "family": name, "nfe": nfe, "stages": student.num_stages, "teacher_nfe": teacher.nfe, "state_mib": state_mib,
        "cache_mib": targets.numel() * targets.element_size() / 2**20, "peak_mib": growth, "fit_peak_mib": fit_growth,
    }


def memory_rows(cases: list[tuple[str, int]]) -> list[dict]:
    """memory_child for each case, each in its own process so freed heap from earlier work cannot hide growth.

    Run twice: with glibc's default allocator (what a user sees; freed 10 MB blocks may stay resident in the heap)
    and with MALLOC_MMAP_THRESHOLD_=65536, where every large tensor is its own mapping, so RSS follows live tensors.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    rows = []
    for name, nfe in cases:
        runs = []
        for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            command = [sys.executable, __file__, "--memory-child", f"{name},{nfe}"]
            result = subprocess.run(command, check=True, capture_output=True, text=True, env={**env, **extra})
            runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        rows.append({**runs[1], "default_peak_mib": runs[0]["peak_mib"]})
    return rows


def memory_cells(row: dict) -> list[str]:
    predicted = row["stages"] * row["state_mib"]
    full = (row["teacher_nfe"] + 1) * row["state_mib"]
    return [
        row["family"], str(row["nfe"]), str(row["stages"]), str(row["teacher_nfe"]), f"{row['cache_mib']:.0f}", f"{predicted:.0f}",
        f"{row['peak_mib']:.0f}", f"{(row['peak_mib'] - row['cache_mib']) / row['state_mib']:.1f}", f"{row['default_peak_mib']:.0f}",
        f"{row['fit_peak_mib']:.0f}", f"{full:.0f}",
    ]


MEMORY_HEADER = [
    "family", "NFE", "stages K", "teacher NFE", "cache tensor (MiB)", "K·|B|·D·8 B (MiB)", "peak growth, teacher run (MiB, live tensors)",
    "… beyond the cache (in states of |B|·D)", "same, default allocator (MiB)", "peak growth, closed-form fit (MiB, live)",
    "all teacher states, official (MiB)",
]


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = args_parser.parse_args()
    if args.memory_child:
        name, nfe = args.memory_child.split(",")
        print(json.dumps(memory_child(name, int(nfe))))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    families = [family("euler"), family("ddim")] if args.quick else FAMILIES
    repeats = 1 if args.quick else 3
    mixture = digits_mixture()
    calib, _ = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))
    exact_rows = []
    for fam in families:
        for mode in ("aligned", "paper"):
            exact_rows.append(calibration_row(fam, mode, mixture, calib, repeats, 0 if mode == "paper" or args.quick else 300))
            print("| " + " | ".join(calibration_cells(exact_rows[-1])) + " |", flush=True)
    torch.manual_seed(0)
    net = EDMPrecond(**SMALL_DDPMPP).eval().requires_grad_(False)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    net_batch = 8 if args.quick else 50
    net_noise = torch.randn(net_batch, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net_rows = []
    for fam in [family("euler")] if args.quick else [family("euler"), family("heun")]:
        net_rows.append(calibration_row(fam, "aligned", net, net_noise, 1, 0))
        print("| " + " | ".join(calibration_cells(net_rows[-1])) + " |", flush=True)
    mem = memory_rows(MEMORY_CASES[:1] if args.quick else MEMORY_CASES)
    exact_table = markdown_table(CALIBRATION_HEADER, [calibration_cells(r) for r in exact_rows])
    net_table = markdown_table(CALIBRATION_HEADER, [calibration_cells(r) for r in net_rows])
    mem_table = markdown_table(MEMORY_HEADER, [memory_cells(r) for r in mem])
    seconds = time.perf_counter() - start
    print(exact_table, net_table, mem_table, sep="\n\n")
    print(f"\n{seconds:.0f} s in all")
    out = output_dir(args)
    if out is None:
        return
    command = "PYTHONPATH=. python benchmarks/cost.py" + (" --quick" if args.quick else "")
    text = f"""## Calibration cost (Table 1 analogue)

`{command}` — {machine()}; {seconds:.0f} s wall.

Unit: the time to sample the same |B| images with the 10-step DDIM of the same side (noise-prediction DDIM on VP
linear for the VP families, Euler = EDM DDIM on Karras for the EDM families), as in the paper's Table 1. Calibration
= one teacher run (keeping only the K target states) + one closed-form fitting pass, C = {SCALE}. The floor counts
network evaluations only: (teacher NFE + student NFE)/10. "Table-1 total for 50k samples" = calibration once +
sampling 50,000 images with the D-solver at this NFE, in units of sampling 50,000 with 10-step DDIM (the paper's
D-EDM: 2.55 at the NFE that reaches FID 3; here at NFE 10 / 9). Times are CPU times of this single-threaded process,
medians of {repeats} runs after a warm-up (the machine's two cores were shared with other jobs, which makes wall time
measure the neighbours; on an idle machine with one thread the two agree). Adam is one run of the full-batch fit
with the `DODECalibration` parametrisation. Families at NFE 10 (Heun 9).

### Exact digits mixture (|B| = 100, 8×8, float64; the denoiser costs about as much as the solver's own tensor work)

{exact_table}

### Small DDPM++ network (EDMPrecond + SongUNet, {params:.2f} M parameters, 16×16×3, random weights, |B| = {net_batch}, 1 thread)

{net_table}

### Peak memory of the teacher cache (FFHQ-64 size)

Each case in a fresh process: |B| = 100 latents of 3×64×64 in float64 (one state = {mem[0]['state_mib']:.1f} MiB), `aligned`
teacher with C = {SCALE}, analytic N(0, I) denoiser so that only the solver's and the cache's memory shows. Peak RSS
growth is VmHWM (reset through /proc/self/clear_refs) minus VmRSS before the call, measured once with
MALLOC_MMAP_THRESHOLD_=65536 (every large tensor its own mapping: RSS follows live tensors) and once with glibc's
default allocator (freed blocks may stay resident). The last column is what keeping every teacher state (the
official implementation) would take.

{mem_table}
"""
    write_section(out, "cost", text)


if __name__ == "__main__":
    main()
