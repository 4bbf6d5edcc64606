"""The best configurations (issue 18 item 5): `train.py --config configs/<model>_best.yaml --model.nfe N`, scored.

Each NFE runs train.py itself (in this process, no logger, no cache) and scores the λ file it writes on held-out
seeds from 1,000,000: RMSE of the final state to the reference ODE state where the run ends (the exact model's ODE
solution; on the learned network its own 128-step Heun ODE), median and 99th percentile of the per-seed RMSE, the
base solver on the same σ (never worse), and the ratio to the best learned peer of issue 18's table; and the RMSE on
twice as many more held-out seeds from 2,000,000 (the RMSE at few steps is carried by about 1 % of the seeds, so one seed can
move the 500-seed figure). Cost: network sample-evaluations of the whole calibration, counted at the denoiser
(forward: rows of every call; backward: rows of the calls a backward pass went through), and its CPU seconds
(train.py's whole process time for the fit, Lightning set-up included).
`--large N` adds N more seeds from 3,000,000 (exact model: 20,000 take ≈ 3 min for their ODE solutions): the RMSE
there, and how many seeds end in another mode (per-seed RMSE > 0.1) — at NFE ≥ 8 those few seeds carry the RMSE,
so 500 seeds rank configurations by luck, 20,000 by their expected error; the GITS and LD3 reproductions of
benchmarks/learned_steps.py are scored there too.
Usage: PYTHONPATH=. python benchmarks/best_configs.py [--quick] [--model exact|network] [--nfe 3,4,5,6,8,10] [--large N] [--out-dir docs]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import CALIBRATION_SEEDS, HELD_OUT_START, machine, markdown_table, output_dir, parser, print_and_write
from benchmarks.learned_steps import Counter, HeldOut, load_model, run_gits, run_ld3
from dode_lightning import lightning
from dode_lightning.api import Student, load_student
from dode_lightning.cli import train_main
from dode_lightning.distill import seeded_noise
from dode_lightning.quiet import silence_lightning_noise
from dode_lightning.solvers import Solver

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"exact": ROOT / "configs" / "gmm_digits_best.yaml", "network": ROOT / "configs" / "edm_digits_net_best.yaml"}
NFES = {"exact": [3, 4, 5, 6, 8, 10], "network": [5, 10]}
# Issue 18's best learned peer (min of GITS, LD3, S4S-like) per NFE, measured from outside on the same seeds.
BEST_PEER = {
    "exact": {3: 0.0932, 4: 0.0588, 5: 0.0421, 6: 0.0578, 8: 0.0354, 10: 0.0162},
    "network": {5: 0.0871, 10: 0.0221},
}
HEADER = ["NFE", "RMSE", "median", "p99", "× best learned peer", "base on the same σ", "RMSE on 2× as many seeds from 2,000,000 (base)", "σ", "forward / backward evaluations", "CPU s"]
MORE_SEEDS = 2_000_000
LARGE_SEEDS = 3_000_000
# A seed whose per-seed RMSE exceeds this ended in another mode than the reference ODE (the typical error at NFE ≥ 5
# is 0.002–0.01, a wrong mode 0.15–0.35 on the digits).
WRONG_MODE = 0.1


def calibrate(config: Path, nfe: int, output: Path) -> tuple[float, Counter]:
    """Run train.py on `config` at this NFE; its CPU seconds and the denoiser's evaluation counts."""
    counted: list[Counter] = []
    load = lightning.load_denoiser

    def load_counting(**kwargs):
        loaded = load(**kwargs)
        counted.append(Counter(loaded.denoiser))
        return dataclasses.replace(loaded, denoiser=counted[-1])

    lightning.load_denoiser = load_counting
    start = time.process_time()
    try:
        code = train_main(["--config", str(config), "--model.nfe", str(nfe), "--trainer.logger", "false", "--data.cache_dir", "null",
                           "--exact_report", "false", "--model.output", str(output)])
    finally:
        lightning.load_denoiser = load
    if code != 0:
        raise SystemExit(f"train.py failed at NFE {nfe} (exit {code})")
    return time.process_time() - start, counted[-1]


def calibrated_student(config: Path, nfe: int) -> Student:
    """The student train.py calibrates from `config` at this NFE (its λ file in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "lambdas.safetensors"
        calibrate(config, nfe, output)
        return load_student(output)


def student_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that studies one config's student on the exact model's large held-out set:
    `--config`, `--nfe`, `--seeds` (resolve the last with `large_seed_count`)."""
    args_parser = parser(doc)
    args_parser.add_argument("--config", type=Path, default=CONFIGS["exact"], help="a train.py config of the exact model")
    args_parser.add_argument("--nfe", type=int, default=10)
    args_parser.add_argument("--seeds", type=int, default=None, help="held-out seeds from 3,000,000 (default 20,000; --quick 2,000)")
    return args_parser


def large_seed_count(args: argparse.Namespace) -> int:
    """`--seeds`, else 20,000 (2,000 with --quick)."""
    return args.seeds or (2_000 if args.quick else 20_000)


def large_held_out(denoiser: torch.nn.Module, reference: Solver, count: int) -> HeldOut:
    """The first `count` held-out seeds from LARGE_SEEDS (3,000,000)."""
    return HeldOut(denoiser, reference, seeded_noise(range(LARGE_SEEDS, LARGE_SEEDS + count), (1, 8, 8))[0])


def shown(config: Path) -> Path:
    """`config` as a reproduce command names it: relative to the repository where it lies inside it."""
    return config.resolve().relative_to(ROOT) if config.resolve().is_relative_to(ROOT) else config


def scores(student: Student, held: HeldOut) -> dict[str, float]:
    """The held-out figures of a student as it samples (its stored first step included)."""
    return held.score(student.sample(held.denoiser, held.noise), student.solver)


def large_scores(out: Tensor, solver: Solver, held: HeldOut) -> tuple[float, int]:
    """RMSE of final states `out` on the large seed set, and how many seeds ended in another mode."""
    per_seed = held.per_seed_mse(out, solver)
    return float(per_seed.mean().sqrt()), int((per_seed.sqrt() > WRONG_MODE).sum())


def large_cells(student: Student, nfe: int, held: HeldOut, large: HeldOut | None) -> list[str]:
    """`--large`: the config's RMSE (seeds in another mode) on the large set, the same for the GITS and LD3
    reproductions of benchmarks/learned_steps.py (calibrated on seeds 0–99, each keeping the student that is better
    on the 500 held-out seeds), and the config's ratio to the better of them there. Empty without `--large`."""
    if large is None:
        return []
    with torch.no_grad():
        ours = large_scores(student.sample(large.denoiser, large.noise), student.solver, large)
        calibration = seeded_noise(CALIBRATION_SEEDS, (1, 8, 8))[0]
        peers = [run(large.denoiser, calibration, nfe, held) for run in (run_gits, run_ld3)]
        theirs = [large_scores(peer.solver.sample(large.denoiser, large.noise), peer.solver, large) for peer in peers]
    return [
        f"{ours[0]:.4f} ({ours[1]})",
        ", ".join(f"{peer.method} {rmse:.4f} ({wrong})" for peer, (rmse, wrong) in zip(peers, theirs)),
        f"{ours[0] / min(rmse for rmse, _ in theirs):.2f}×",
    ]


def row(model: str, nfe: int, lambda_file: Path, seconds: float, counts: Counter, held: HeldOut, more: HeldOut, large: HeldOut | None) -> list[str]:
    student = load_student(lambda_file)
    base_student = dataclasses.replace(student, lambdas=torch.zeros_like(student.lambdas))  # λ = 0: the base solver
    d_scores, base = scores(student, held), scores(base_student, held)["rmse"]
    peer = BEST_PEER[model].get(nfe)
    return [
        str(nfe),
        f"{d_scores['rmse']:.4f}",
        f"{d_scores['median']:.4f}",
        f"{d_scores['p99']:.4f}",
        "–" if peer is None else f"{d_scores['rmse'] / peer:.2f}×",
        f"{base:.4f}",
        f"{scores(student, more)['rmse']:.4f} ({scores(base_student, more)['rmse']:.4f})",
        *large_cells(student, nfe, held, large),
        ", ".join(f"{float(s):.3g}" for s in student.sigmas),
        f"{counts.forward_rows:,} / {counts.backward_rows:,}",
        f"{seconds:.1f}",
    ]


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=["exact", "network"], default="exact")
    args_parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default: 3,4,5,6,8,10 exact, 5,10 network)")
    args_parser.add_argument("--large", type=int, default=0, help="also score on this many seeds from 3,000,000 (RMSE, seeds in another mode)")
    args_parser.add_argument("--config", default=None, help="score this config file instead: one of configs/ writes docs/best_configs_<its name>.md, any other file nothing")
    args = args_parser.parse_args()
    silence_lightning_noise()
    torch.set_num_threads(1)
    nfes = [5] if args.quick and not args.nfe else [int(n) for n in args.nfe.split(",")] if args.nfe else NFES[args.model]
    denoiser, reference, count = load_model(args.model)
    count = 50 if args.quick else count
    held = HeldOut(denoiser, reference, seeded_noise(range(HELD_OUT_START, HELD_OUT_START + count), (1, 8, 8))[0])
    more = HeldOut(denoiser, reference, seeded_noise(range(MORE_SEEDS, MORE_SEEDS + (100 if args.quick else 2 * count)), (1, 8, 8))[0])
    large = large_held_out(denoiser, reference, args.large) if args.large else None
    large_header = [f"RMSE on {args.large:,} seeds from 3,000,000 (seeds in another mode)", "GITS, LD3 there", "× better of them there"]
    header = HEADER[:7] + (large_header if large else []) + HEADER[7:]
    config = CONFIGS[args.model] if args.config is None else Path(args.config).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for nfe in nfes:
            output = Path(folder) / f"nfe{nfe}.safetensors"
            rows.append(row(args.model, nfe, output, *calibrate(config, nfe, output), held, more, large))
            print(markdown_table(header, rows[-1:]), flush=True)
    text = (
        f"Best configuration `{shown(config)}` on the {args.model} model ({count} held-out seeds from {HELD_OUT_START:,}; "
        f"{machine()}). Reproduce: `PYTHONPATH=. python benchmarks/best_configs.py --model {args.model}"
        f"{'' if args.config is None else f' --config {args.config}'}{f' --large {args.large}' if large else ''}`.\n\n"
        + markdown_table(header, rows)
    )
    shipped = config.parent == ROOT / "configs"
    name = f"best_configs_{args.model}.md" if args.config is None else f"best_configs_{config.stem}.md"
    print_and_write(text, None if output_dir(args) is None or not shipped else output_dir(args) / name)


if __name__ == "__main__":
    main()
