"""How far the best configuration's own family of students can go on the exact model (issue 18: is NFE 10 held
back by the calibration, or by what an N-call D-iPNDM student can express?).

This calibrates `train.py --config <config> --model.nfe N` (as benchmarks/best_configs.py does), then refits its
step positions and λ with the same joint fit (L-BFGS, final state + 0.1 × the per-stage states) against the exact
ODE itself instead of a teacher, on `--calibration-seeds` seeds (0, 1, …; the config's batch is 100 of them). No
teacher error and ten times the batch: what is left on held-out seeds is the family's floor at that NFE. Both
students are scored on `--seeds` held-out seeds from 3,000,000: RMSE to the exact ODE, the seeds that end in another
mode (per-seed RMSE > 0.1), and the RMSE without them.
Usage: PYTHONPATH=. python benchmarks/family_floor.py [--quick] [--config configs/gmm_digits_best.yaml] [--nfe 10]
       [--calibration-seeds 1000] [--iterations 100] [--seeds 20000] [--out-dir docs]
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmarks.best_configs import WRONG_MODE, calibrated_student, large_held_out, large_seed_count, shown, student_parser
from benchmarks.common import machine, markdown_table, output_dir, print_and_write
from benchmarks.learned_steps import HeldOut, load_model
from dode_lightning.api import Student
from dode_lightning.denoisers import FirstStepMean
from dode_lightning.distill import fit_closed_form, seeded_noise
from dode_lightning.gmm import GaussianMixture
from dode_lightning.joint_fit import JointFit, JointSettings, TeacherPath
from dode_lightning.quiet import silence_lightning_noise
from dode_lightning.schedules import EDM
from dode_lightning.solvers import SOLVERS

# Exact states on this many log-spaced σ between the student's ends: the per-stage targets are read off them
# (linear in log σ, as from a teacher run), 0.04 apart in log σ.
PATH_POINTS = 241


def exact_path(mixture: GaussianMixture, x: Tensor, sigma_start: float, sigma_end: float) -> TeacherPath:
    """The exact ODE's states from `x` at σ_start on PATH_POINTS log-spaced σ down to σ_end."""
    sigmas = torch.logspace(torch.log10(torch.tensor(sigma_start)), torch.log10(torch.tensor(sigma_end)), PATH_POINTS, dtype=torch.float64)
    sigmas[0], sigmas[-1] = sigma_start, sigma_end
    states = [x.to(torch.float64)]
    for upper, lower in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        states.append(mixture.exact_endpoint(states[-1], upper, sigma_end=lower))
    return TeacherPath(sigmas, torch.stack(states))


def refit(mixture: GaussianMixture, student: Student, seeds: int, iterations: int) -> tuple[Student, float, float, float]:
    """The student's σ and λ refitted against the exact ODE on `seeds` seeds; (student, loss before, after, seconds)."""
    start = time.process_time()
    solver, name = student.solver, student.metadata["solver"]
    noise = seeded_noise(range(seeds), (1, 8, 8))[0].to(torch.float64)
    x = solver.init_state(noise)
    path = exact_path(mixture, x, float(solver.sigmas[0]), float(solver.sigmas[-1]))
    denoiser = mixture if student.first_denoised is None else FirstStepMean(mixture, float(solver.sigmas[0]), student.first_denoised)
    aligned = torch.stack([path.at(sigma) for sigma in solver.target_sigmas])
    scales = fit_closed_form(solver, denoiser, noise, aligned, layout=student.layout).natural_scales()
    settings = JointSettings(intermediate=0.1)
    fit = JointFit(name, solver.sigmas, EDM(), denoiser, noise, path.states[-1], student.lambdas, student.layout, settings, lambda_scale=scales, path=path)
    result = fit.fit(iterations)
    refitted = Student(SOLVERS[name].from_grid(result.sigmas, EDM()), result.lambdas, student.layout, student.metadata, student.first_denoised)
    return refitted, result.loss_start, result.loss_end, time.process_time() - start


def row(name: str, student: Student, held: HeldOut) -> list[str]:
    per_seed = held.per_seed_mse(student.sample(held.denoiser, held.noise), student.solver)
    lost = per_seed.sqrt() > WRONG_MODE
    return [name, f"{float(per_seed.mean().sqrt()):.4f}", str(int(lost.sum())), f"{float(per_seed[~lost].mean().sqrt()):.4f}"]


def main() -> None:
    args_parser = student_parser(__doc__)
    args_parser.add_argument("--calibration-seeds", type=int, default=None, help="seeds of the exact refit (default 1,000; --quick 100)")
    args_parser.add_argument("--iterations", type=int, default=None, help="L-BFGS iterations of the refit (default 100; --quick 10)")
    args = args_parser.parse_args()
    args.calibration_seeds = args.calibration_seeds or (100 if args.quick else 1_000)
    args.iterations = args.iterations or (10 if args.quick else 100)
    args.seeds = large_seed_count(args)
    silence_lightning_noise()
    torch.set_num_threads(1)
    mixture, reference, _ = load_model("exact")
    student = calibrated_student(args.config, args.nfe)
    refitted, loss_start, loss_end, seconds = refit(mixture, student, args.calibration_seeds, args.iterations)
    held = large_held_out(mixture, reference, args.seeds)
    config = shown(args.config)
    rows = [
        row(f"`{config}` (train.py: its teacher targets on its batch)", student, held),
        row(f"its σ and λ refitted on the exact ODE, {args.calibration_seeds:,} seeds", refitted, held),
    ]
    text = (
        f"The family's floor at NFE {args.nfe} on the exact model: `{config}`, then its σ and λ refitted by the same joint fit "
        f"({args.iterations} L-BFGS iterations, final state + 0.1 × per-stage states) against the exact ODE on seeds 0 … "
        f"{args.calibration_seeds - 1:,} (training loss {loss_start:.3e} → {loss_end:.3e} in {seconds:.0f} CPU s). Scored on "
        f"{args.seeds:,} held-out seeds from 3,000,000. {machine()}. Reproduce: `PYTHONPATH=. python benchmarks/family_floor.py "
        f"--config {config} --nfe {args.nfe} --calibration-seeds {args.calibration_seeds} --iterations {args.iterations} --seeds {args.seeds}`.\n\n"
        + markdown_table(["student", "RMSE", "seeds in another mode", "RMSE without them"], rows)
        + "\n"
    )
    out = output_dir(args)
    print_and_write(text, None if out is None else out / f"family_floor_nfe{args.nfe}.md")


if __name__ == "__main__":
    main()
