"""The best configurations (issue 18 item 5): `train.py --config configs/<model>_best.yaml --model.nfe N`, scored.

Each NFE runs train.py itself (in this process, no logger, no cache) and scores the λ file it writes on held-out
seeds from 1,000,000: RMSE of the final state to the reference ODE state where the run ends (the exact model's ODE
solution; on the learned network its own 128-step Heun ODE), median and 99th percentile of the per-seed RMSE, the
base solver on the same σ (never worse), and the ratio to the best learned peer of issue 18's table. Cost: network
sample-evaluations of the calibration (teacher run + student runs, forward only) and its CPU seconds (train.py's
whole process time for the fit, Lightning set-up included).
Usage: PYTHONPATH=. python benchmarks/best_configs.py [--quick] [--model exact|network] [--nfe 3,4,5,6,8,10] [--out-dir docs]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import HELD_OUT_START, machine, markdown_table, output_dir, parser, print_and_write
from benchmarks.learned_steps import HeldOut, load_model
from dode_lightning.api import load_student
from dode_lightning.cli import train_main
from dode_lightning.distill import seeded_noise
from dode_lightning.quiet import silence_lightning_noise

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"exact": ROOT / "configs" / "gmm_digits_best.yaml", "network": ROOT / "configs" / "edm_digits_net_best.yaml"}
NFES = {"exact": [3, 4, 5, 6, 8, 10], "network": [5, 10]}
# Issue 18's best learned peer (min of GITS, LD3, S4S-like) per NFE, measured from outside on the same seeds.
BEST_PEER = {
    "exact": {3: 0.0932, 4: 0.0588, 5: 0.0421, 6: 0.0578, 8: 0.0354, 10: 0.0162},
    "network": {5: 0.0871, 10: 0.0221},
}
HEADER = ["NFE", "RMSE", "median", "p99", "× best learned peer", "base on the same σ", "σ", "evaluations (forward × rows)", "CPU s"]


def calibrate(config: Path, nfe: int, output: Path) -> float:
    """Run train.py on `config` at this NFE; its CPU seconds."""
    start = time.process_time()
    code = train_main(["--config", str(config), "--model.nfe", str(nfe), "--trainer.logger", "false", "--data.cache_dir", "null",
                       "--exact_report", "false", "--model.output", str(output)])
    if code != 0:
        raise SystemExit(f"train.py failed at NFE {nfe} (exit {code})")
    return time.process_time() - start


def row(model: str, nfe: int, lambda_file: Path, seconds: float, held: HeldOut) -> list[str]:
    student = load_student(lambda_file)
    meta = student.metadata
    shape = held.noise.shape[1:]
    d_scores = held(SimpleNamespace(solver=student.solver, lambdas=student.layout.expand(student.lambdas, shape)))
    base = held(SimpleNamespace(solver=student.solver, lambdas=None))["rmse"]
    evaluations = (int(meta["teacher_nfe"]) + 2 * student.nfe) * int(meta["batch_size"])  # teacher, fit and final statistics
    peer = BEST_PEER[model].get(nfe)
    return [
        str(nfe),
        f"{d_scores['rmse']:.4f}",
        f"{d_scores['median']:.4f}",
        f"{d_scores['p99']:.4f}",
        "–" if peer is None else f"{d_scores['rmse'] / peer:.2f}×",
        f"{base:.4f}",
        ", ".join(f"{float(s):.3g}" for s in student.sigmas),
        f"{evaluations:,}",
        f"{seconds:.1f}",
    ]


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=["exact", "network"], default="exact")
    args_parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default: 3,4,5,6,8,10 exact, 5,10 network)")
    args = args_parser.parse_args()
    silence_lightning_noise()
    torch.set_num_threads(1)
    nfes = [5] if args.quick and not args.nfe else [int(n) for n in args.nfe.split(",")] if args.nfe else NFES[args.model]
    denoiser, reference, count = load_model(args.model)
    count = 50 if args.quick else count
    held = HeldOut(denoiser, reference, seeded_noise(range(HELD_OUT_START, HELD_OUT_START + count), (1, 8, 8))[0])
    config = CONFIGS[args.model]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for nfe in nfes:
            output = Path(folder) / f"nfe{nfe}.safetensors"
            rows.append(row(args.model, nfe, output, calibrate(config, nfe, output), held))
            print(markdown_table(HEADER, rows[-1:]), flush=True)
    text = (
        f"Best configuration `{config.relative_to(ROOT)}` on the {args.model} model ({count} held-out seeds from {HELD_OUT_START:,}; "
        f"{machine()}). Reproduce: `PYTHONPATH=. python benchmarks/best_configs.py --model {args.model}`.\n\n"
        + markdown_table(HEADER, rows)
    )
    print_and_write(text, None if output_dir(args) is None else output_dir(args) / f"best_configs_{args.model}.md")


if __name__ == "__main__":
    main()
