"""Sampling overhead of the D-solver: D-solver / base-solver time at equal NFE.

With the full-size FFHQ-64 DDPM++ network (EDMPrecond + SongUNet, random weights, batch 1, a few NFE) and with the
exact digits mixture (every family, NFE 10 / Heun 9, batch 100 and 1000). The D-solver adds one axpy
(x̃_k + λ_k·Δ_k) per stage; Δ_k itself is formed by the base solver too. CPU time, single thread.
Usage: PYTHONPATH=. python benchmarks/overhead.py [--quick] [--out-dir docs]
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import (
    FAMILIES,
    FFHQ_DDPMPP,
    HELD_OUT_START,
    Family,
    family,
    machine,
    markdown_table,
    paired_cpu_times,
    output_dir,
    parser,
    write_section,
)
from dode_lightning.denoisers import Denoiser
from dode_lightning.distill import SolverSetup, seeded_noise
from dode_lightning.gmm import digits_mixture
from dode_lightning.networks import EDMPrecond


def ratio_row(fam: Family, nfe: int, denoiser: Denoiser, noise: torch.Tensor, repeats: int) -> list[str]:
    """Base and D-solver CPU time, measured alternately (λ = 0.1 everywhere: the cost does not depend on the values)."""
    solver = SolverSetup.resolve(fam.solver, nfe, fam.make_schedule()).build()
    lambdas = torch.full((solver.num_stages,), 0.1, dtype=torch.float64)
    with torch.no_grad():
        base, d_ode = paired_cpu_times(lambda: solver.sample(denoiser, noise), lambda: solver.sample(denoiser, noise, lambdas), repeats)
    return [fam.solver, str(solver.nfe), str(len(noise)), f"{base * 1e3:.1f}", f"{d_ode * 1e3:.1f}", f"{d_ode / base:.3f}"]


HEADER = ["family", "NFE", "batch", "base (ms)", "D-solver (ms)", "D / base"]


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    mixture = digits_mixture()
    exact_rows = []
    exact_repeats, net_repeats = (3, 1) if args.quick else (25, 3)
    families = [family("euler"), family("dpm_solver_3")] if args.quick else FAMILIES
    for batch in (100,) if args.quick else (100, 1000):
        noise, _ = seeded_noise(range(HELD_OUT_START, HELD_OUT_START + batch), (1, 8, 8))
        for fam in families:
            exact_rows.append(ratio_row(fam, 9 if fam.solver == "heun" else 10, mixture, noise, exact_repeats))
            print("| " + " | ".join(exact_rows[-1]) + " |", flush=True)
    torch.manual_seed(0)
    net = EDMPrecond(**FFHQ_DDPMPP).eval().requires_grad_(False)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    image, _ = seeded_noise([HELD_OUT_START], (3, 64, 64))
    net_cases = [("euler", 2)] if args.quick else [("euler", 5), ("heun", 5), ("dpm_solver_pp_3m", 5)]
    net_rows = []
    for name, nfe in net_cases:
        net_rows.append(ratio_row(family(name), nfe, net, image, net_repeats))
        print("| " + " | ".join(net_rows[-1]) + " |", flush=True)
    exact_table = markdown_table(HEADER, exact_rows)
    net_table = markdown_table(HEADER, net_rows)
    seconds = time.perf_counter() - start
    print(exact_table, net_table, sep="\n\n")
    print(f"\n{seconds:.0f} s in all")
    out = output_dir(args)
    if out is None:
        return
    command = "PYTHONPATH=. python benchmarks/overhead.py" + (" --quick" if args.quick else "")
    text = f"""## Sampling overhead: D-solver vs base solver at equal NFE

`{command}` — {machine()}; {seconds:.0f} s wall.

CPU time of one sampling run of this single-threaded process (median; base and D runs alternate after one warm-up
of each, so load drifts from other jobs on the shared cores hit both alike), λ = 0.1 at every stage (the cost does
not depend on the values). The D-solver adds one x̃ + λ·Δ per stage; Δ is formed by the base path as well. DDP on 2 processes vs 1 is
measured through the sampling entry point by `benchmarks/sampling.py` (see Findings).

### FFHQ-64 DDPM++ (EDMPrecond + SongUNet, {params:.2f} M parameters, random weights), batch 1, EDM schedule, median of {net_repeats}

{net_table}

### Exact digits mixture (8×8, float64), median of {exact_repeats}

{exact_table}
"""
    write_section(out, "overhead", text)


if __name__ == "__main__":
    main()
