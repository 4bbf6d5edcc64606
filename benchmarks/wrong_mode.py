"""Where the seeds that end in another mode go astray (issue 18: why NFE 10 stays near 0.57× the learned peers).

At NFE ≥ 8 the held-out RMSE of the best configuration on the exact model is carried by the few seeds whose final
state lies in another mixture component than the exact ODE's (per-seed RMSE > 0.1). This calibrates
`train.py --config <config> --model.nfe N` (as benchmarks/best_configs.py does), finds those seeds among N held-out
seeds from 3,000,000, and follows the student along its stages: per stage, the RMSE of its state to the exact ODE
state at the same σ (those seeds, and the others), and how many of them are already lost there — the exact ODE
continued from the student's state ends in the other mode. Then, on the first `--first-step-seeds` seeds, what one
step from σ_max alone does: one DDIM/Euler step to the student's σ_1 (with the network's x̂₀, and with the batch-mean
x̂₀ of `first_step: mean`), then the exact ODE to the end, against the exact ODE all the way.
Usage: PYTHONPATH=. python benchmarks/wrong_mode.py [--quick] [--config configs/gmm_digits_best.yaml] [--nfe 10] [--seeds 20000]
       [--first-step-seeds 4000] [--out-dir docs]
"""
from __future__ import annotations


import torch
from torch import Tensor

from benchmarks.best_configs import WRONG_MODE, calibrated_student, large_held_out, large_seed_count, shown, student_parser
from benchmarks.common import machine, markdown_table, output_dir, print_and_write
from benchmarks.learned_steps import load_model
from dode_lightning.api import Student
from dode_lightning.gmm import GaussianMixture
from dode_lightning.quiet import silence_lightning_noise


def per_seed_rmse(x: Tensor, reference: Tensor) -> Tensor:
    return ((x - reference).flatten(1) ** 2).mean(1).sqrt()


def exact_from(mixture: GaussianMixture, x: Tensor, sigma: float, sigma_end: float, chunk: int = 100) -> Tensor:
    """The exact ODE state at `sigma_end` from states `x` (VE form) at `sigma`."""
    return torch.cat([mixture.exact_endpoint(part, sigma, sigma_end=sigma_end) for part in torch.split(x, chunk)])


def stage_table(mixture: GaussianMixture, student: Student, noise: Tensor, end: Tensor, lost: Tensor, others: int) -> list[list[str]]:
    """Per stage: state RMSE to the exact ODE (lost seeds / the first `others` of the rest) and how many lost seeds
    are lost there."""
    keep = lost | (torch.cumsum((~lost).long(), 0) <= others)  # the exact ODE to every stage costs: not all seeds
    noise, end, lost = noise[keep], end[keep], lost[keep]
    solver = student.solver
    states: list[tuple[float, Tensor]] = []
    student.sample(mixture, noise, observe=lambda k, _stage, x: states.append((float(solver.target_sigmas[k]), x.clone())))
    start, sigma_start, sigma_end = solver.init_state(noise), float(solver.sigmas[0]), float(solver.sigmas[-1])
    rows = []
    for sigma, state in states:
        error = per_seed_rmse(state, exact_from(mixture, start, sigma_start, sigma))
        continued = exact_from(mixture, state[lost], sigma, sigma_end) if sigma > sigma_end else state[lost]
        already = int((per_seed_rmse(continued, end[lost]) > WRONG_MODE).sum())
        rows.append([f"{sigma:.4g}", f"{error[lost].mean():.4f}", f"{error[~lost].mean():.4f}", f"{already} of {int(lost.sum())}"])
    return rows


def first_step_rows(mixture: GaussianMixture, student: Student, noise: Tensor, end: Tensor) -> list[list[str]]:
    """One step from σ_max to the student's σ_1, then the exact ODE: seeds that end in another mode."""
    solver = student.solver
    sigma_max, sigma_1, sigma_end = float(solver.sigmas[0]), float(solver.sigmas[1]), float(solver.sigmas[-1])
    x = solver.init_state(noise)
    with torch.no_grad():
        network = mixture(x, torch.full((len(x),), sigma_max, dtype=torch.float64))
    candidates = [("the network's x̂₀", network)]
    if student.first_denoised is not None:
        candidates.append(("the stored batch-mean x̂₀ (first_step mean)", student.first_denoised.to(x).expand_as(x)))
    rows = []
    for name, denoised in candidates:
        stepped = denoised + (sigma_1 / sigma_max) * (x - denoised)  # DDIM / Euler: x̂₀ held from σ_max to σ_1
        wrong = int((per_seed_rmse(exact_from(mixture, stepped, sigma_1, sigma_end), end) > WRONG_MODE).sum())
        rows.append([f"{sigma_max:g} → {sigma_1:.4g}, {name}", f"{wrong} of {len(x):,}"])
    return rows


def main() -> None:
    args_parser = student_parser(__doc__)
    args_parser.add_argument("--first-step-seeds", type=int, default=None, help="seeds of the one-step check and of the other seeds' column (default 4,000; --quick 500)")
    args = args_parser.parse_args()
    args.seeds = large_seed_count(args)
    args.first_step_seeds = args.first_step_seeds or (500 if args.quick else 4_000)
    silence_lightning_noise()
    torch.set_num_threads(1)
    mixture, reference, _ = load_model("exact")
    student = calibrated_student(args.config, args.nfe)
    held = large_held_out(mixture, reference, args.seeds)
    end = held.exact(student.solver)
    final = student.sample(mixture, held.noise)
    per_seed = held.per_seed_mse(final, student.solver)
    lost = per_seed.sqrt() > WRONG_MODE
    stages = stage_table(mixture, student, held.noise.to(torch.float64), end, lost, args.first_step_seeds)
    count = min(args.first_step_seeds, args.seeds)
    first = first_step_rows(mixture, student, held.noise[:count].to(torch.float64), end[:count])
    config = shown(args.config)
    text = (
        f"Seeds that end in another mode, `{config}` "
        f"at NFE {args.nfe} on the exact model: {int(lost.sum())} of {args.seeds:,} held-out seeds from 3,000,000 "
        f"(RMSE {float(per_seed.mean().sqrt()):.4f}, without them {float(per_seed[~lost].mean().sqrt()):.4f}). "
        f"{machine()}. Reproduce: `PYTHONPATH=. python benchmarks/wrong_mode.py --config {config} --nfe {args.nfe} --seeds {args.seeds} "
        f"--first-step-seeds {args.first_step_seeds}`.\n\n"
        "Along the student (\"lost there\": the exact ODE continued from the student's state at that σ ends in the other mode):\n\n"
        + markdown_table(["σ of the state", "state RMSE to the exact ODE, those seeds", f"{args.first_step_seeds:,} of the others", "lost there"], stages)
        + f"\n\nOne step from σ_max alone, then the exact ODE (first {count:,} seeds; the student itself loses "
        f"{int(lost[:count].sum())} of them):\n\n"
        + markdown_table(["step", "seeds in another mode"], first)
        + "\n"
    )
    out = output_dir(args)
    print_and_write(text, None if out is None else out / f"wrong_mode_nfe{args.nfe}.md")


if __name__ == "__main__":
    main()
