"""Sampling throughput and FID through sample.py (trainer.predict), on this CPU.

1. images/s with 1 and 2 processes (gloo DDP) on the built-in digits model and on a tiny EDM network (random weights,
   written as an EDM pickle); 2. D-solver vs base-solver wall time at the same NFE; 3. FD_pix (the built-in model's
   substitute FID: Fréchet distance on raw pixels against 10,000 exact mixture samples; NOT Inception FID) of 1,000
   samples, D vs base, NFE 5, with λ calibrated by train.py. images/s counts the predict loop only (between
   barriers), not process start-up or the DDP launch.
Usage: python benchmarks/sampling.py [--quick] [--out docs/sampling_bench.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import print_and_write

ROOT = Path(__file__).resolve().parents[1]
TINY_EDM = dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
RATE = re.compile(r"predict ([\d.]+) s, ([\d.]+) images/s")


def _python(args: list[str], cwd: Path, threads: int = 1) -> str:
    # One intra-op thread per process unless asked: on a shared 2-core machine a 2-thread pool spins against other
    # jobs (10–20× slowdowns seen); Lightning's DDP launcher makes the same choice (cores / processes).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def _sample(
    cwd: Path, config: Path, outdir: Path, seeds: str, lambdas: str = "none", processes: int = 1, *extra: str, threads: int = 1
) -> tuple[float, float]:
    """(predict seconds, images/s) of one fresh sample.py run."""
    args = [str(ROOT / "sample.py"), "--config", str(config), "--lambdas", lambdas, "--seeds", seeds, "--outdir", str(outdir), *extra]
    if processes > 1:
        args += ["--trainer.devices", str(processes), "--trainer.strategy", "ddp"]
    match = RATE.search(_python(args, cwd, threads))
    return float(match[1]), float(match[2])


def _tiny_edm_config(work: Path) -> tuple[Path, int]:
    from dode_lightning.checkpoints.edm_writer import write_edm_snapshot
    from dode_lightning.networks import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(**TINY_EDM).eval()
    write_edm_snapshot(work / "tiny-edm.pkl", net)
    config = yaml.safe_load((ROOT / "configs" / "gmm_digits.yaml").read_text())
    config["model"]["denoiser"] = {"source": "edm_pickle", "path": str(work / "tiny-edm.pkl")}
    path = work / "tiny_edm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, sum(p.numel() for p in net.parameters())


def _calibrate(cwd: Path, solver: str, nfe: int) -> Path:
    out = cwd / f"lambdas-{solver}-{nfe}.safetensors"
    _python([str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "gmm_digits.yaml"), "--model.solver", solver, "--model.nfe", str(nfe), "--model.output", str(out)], cwd)
    return out


def _exact_floor(count: int) -> float:
    """FD_pix of `count` exact mixture samples (another seed) against the same exact reference: the finite-n bias."""
    from dode_lightning.fid import clamped_fid, exact_reference_images, load_detector, make_metric

    metric = make_metric(load_detector("pixels", (1, 8, 8)))
    metric.update(exact_reference_images(10_000, class_conditional=False), real=True)
    metric.update(exact_reference_images(count, class_conditional=False, seed=7), real=False)
    return clamped_fid(metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes): few seeds, no FID section")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: docs/sampling_bench.md for full runs)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "sampling_bench.md")
    n_gmm, n_edm, n_fid = (256, 128, 0) if args.quick else (4096, 512, 1000)
    gmm_config = ROOT / "configs" / "gmm_digits.yaml"
    lines = [
        "# Sampling benchmark",
        "",
        f"`python benchmarks/sampling.py{' --quick' if args.quick else ''}` — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Every figure is one fresh "
        "`sample.py` run; images/s = generated images / predict-loop seconds (start-up and DDP launch excluded). "
        "Base solver unless stated; `--batch-size 64 --eval-batch 64`; one thread per process unless the table says "
        f"otherwise. Load average {os.getloadavg()[0]:.1f} at the start (other jobs on the machine make ratios rough).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        edm_config, edm_params = _tiny_edm_config(work)
        rows = ["| model | seeds | processes × threads | predict s | images/s |", "|---|---|---|---|---|"]
        for label, config, count in (
            ("built-in digits mixture (8×8), Heun NFE 9", gmm_config, n_gmm),
            (f"tiny EDM SongUNet ({edm_params / 1e3:.0f} k params, 3×16×16), Heun NFE 9", edm_config, n_edm),
        ):
            # 1 × 2 against 2 × 1 is the equal-total-cores comparison; sample.py always runs the built-in model
            # on one thread, so it has no 1 × 2 row.
            layouts = ((1, 1), (2, 1)) if config == gmm_config else ((1, 1), (1, 2), (2, 1))
            for processes, threads in layouts:
                outdir = work / f"{config.stem}-{processes}x{threads}"
                seconds, rate = _sample(work, config, outdir, f"0-{count - 1}", "none", processes, threads=threads)
                rows.append(f"| {label} | {count} | {processes} × {threads} | {seconds:.2f} | {rate:.1f} |")
                print(rows[-1], flush=True)
        lines += ["## Throughput", "", *rows, ""]

        lam9 = _calibrate(work, "heun", 9)
        rows = ["| solver | NFE | λ | predict s | images/s |", "|---|---|---|---|---|"]
        for name, lam in (("base", "none"), ("D-solver", str(lam9))):
            seconds, rate = _sample(work, gmm_config, work / f"timing-{name}", f"0-{n_gmm - 1}", lam)
            rows.append(f"| Heun ({name}) | 9 | {'fitted' if lam != 'none' else '—'} | {seconds:.2f} | {rate:.1f} |")
            print(rows[-1], flush=True)
        lines += ["## D-solver vs base solver (built-in model, 1 process, same NFE)", "", *rows, ""]

        if n_fid:
            rows = ["| solver | NFE | FD_pix base | FD_pix D-solver | ratio |", "|---|---|---|---|---|"]
            for solver in ("heun", "euler"):
                lam = _calibrate(work, solver, 5)
                values = {}
                for name, lam_arg in (("base", "none"), ("d", str(lam))):
                    outdir = work / f"fid-{solver}-{name}"
                    _sample(work, gmm_config, outdir, f"0-{n_fid - 1}", lam_arg, 1, "--model.solver", solver, "--model.nfe", "5", "--fid-ref", "exact")
                    values[name] = json.loads((outdir / "metrics.json").read_text())["value"]
                rows.append(f"| {solver} | 5 | {values['base']:.4f} | {values['d']:.4f} | {values['d'] / values['base']:.2f} |")
                print(rows[-1], flush=True)
            rows.append(f"| exact samples (floor at n = {n_fid}) | — | {_exact_floor(n_fid):.4f} | | |")
            lines += [
                f"## FD_pix, {n_fid} samples (seeds 0–{n_fid - 1}), built-in model, NFE 5",
                "",
                "FD_pix: Fréchet distance of the 64 raw pixels (uint8 → [−1, 1]) against 10,000 exact samples of the "
                "mixture (the `--fid-ref exact` reference). **Not Inception FID**; only comparable at equal n. "
                "λ from `train.py` (C = 10, |B| = 100, aligned targets).",
                "",
                *rows,
                "",
            ]
    print_and_write("\n".join(lines), out)


if __name__ == "__main__":
    main()
