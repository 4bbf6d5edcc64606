"""Start-up time of the command lines: `--help`, `--print_config`, `fid-ref`, `fid`, `export-scheduler`.

Each command runs as a fresh interpreter (as a user types it) in the tree being measured, alternately with the same
command in a `--before` tree (e.g. an older checkout), so both see the same machine load. Reported per command:
median wall seconds and median CPU seconds (user + system of the child; on an idle machine wall ≈ CPU for these
single-threaded imports, on a shared one CPU is the steadier figure), and whether pytorch_lightning / torchmetrics
were imported. Fixtures (8×8 PNG folders, a reference npz, a λ file) are made in a temporary folder.
Usage: PYTHONPATH=. python benchmarks/startup.py [--before DIR] [--repeats 5] [--out docs/startup.md]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pytorch_lightning", "torchmetrics")
# Runs a script as `python script args` would, then reports which heavy packages the command imported.
_PROBE = (
    "import runpy, sys; script, *args = sys.argv[1:]; sys.argv = [script, *args]; code = 0\n"
    "try:\n    runpy.run_path(script, run_name='__main__')\n"
    "except SystemExit as stop:\n    code = stop.code\n"
    f"print('\\nHEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules) or '-', file=sys.stderr)"
)


def png_folders(folder: Path, count: int) -> None:
    """`real/` and `fake/` in `folder`, each holding `count` random 8×8 grey PNGs (seeded)."""
    generator = np.random.default_rng(0)
    for name in ("real", "fake"):
        (folder / name).mkdir()
        for i in range(count):
            Image.fromarray(generator.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / name / f"{i:03d}.png")


def _fixtures(folder: Path) -> dict[str, str]:
    """Two folders of 8×8 grey PNGs, a λ file of the built-in model (train.py, tiny), their paths by name."""
    png_folders(folder, 32)
    lambdas = folder / "lambdas.safetensors"
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "gmm_digits.yaml"), "--model.nfe", "3",
         "--data.scale", "2", "--data.batch_size", "4", "--data.cache_dir", "null", "--trainer.logger", "false",
         "--exact_report", "false", "--model.output", str(lambdas)],
        check=True, capture_output=True, cwd=folder,
    )
    subprocess.run([sys.executable, str(ROOT / "sample.py"), "fid-ref", "--images", str(folder / "real"), "--out", str(folder / "ref.npz")],
                   check=True, capture_output=True, cwd=folder)
    return {"real": str(folder / "real"), "fake": str(folder / "fake"), "ref": str(folder / "ref.npz"), "lambdas": str(lambdas), "tmp": str(folder)}


def commands(f: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(label, [script, args…]) with the script relative to the tree measured."""
    config = "configs/gmm_digits.yaml"
    sample_args = ["--config", config, "--seeds", "0-9", "--outdir", f"{f['tmp']}/out"]
    return [
        ("sample.py --help", ["sample.py", "--help"]),
        ("sample.py --print_config (--lambdas none)", ["sample.py", *sample_args, "--lambdas", "none", "--print_config"]),
        ("sample.py --print_config (λ file)", ["sample.py", *sample_args, "--lambdas", f["lambdas"], "--print_config"]),
        ("sample.py fid-ref (32 PNGs, pixels)", ["sample.py", "fid-ref", "--images", f["real"], "--out", f"{f['tmp']}/ref2.npz"]),
        ("sample.py fid (32 PNGs vs npz)", ["sample.py", "fid", "--images", f["fake"], "--fid-ref", f["ref"]]),
        ("sample.py export-scheduler --help", ["sample.py", "export-scheduler", "--help"]),
        ("sample.py export-scheduler (refused λ file)", ["sample.py", "export-scheduler", "--lambdas", f["lambdas"], "--pipeline", f["tmp"], "--out", f"{f['tmp']}/sched"]),
        ("train.py --help", ["train.py", "--help"]),
        ("train.py --print_config", ["train.py", "--config", config, "--print_config"]),
    ]


def run_once(tree: Path, argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, heavy modules imported) of one fresh interpreter running the command in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tree / argv[0]), *argv[1:]], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    heavy = done.stderr.rsplit("HEAVY ", 1)[-1].strip() if "HEAVY " in done.stderr else f"failed: {done.stderr[-300:]}"
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another tree to measure alternately (e.g. an older checkout)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the Markdown table here (e.g. docs/startup.md)")
    args = parser.parse_args()
    trees = {"after": ROOT} if args.before is None else {"before": args.before.resolve(), "after": ROOT}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = _fixtures(Path(tmp))
        rows = []
        for label, argv in commands(fixtures):
            results: dict[str, list[tuple[float, float, str]]] = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    results[name].append(run_once(tree, argv))
            cells = [label]
            for name in trees:
                walls, cpus, heavy = zip(*results[name])
                cells += [f"{statistics.median(walls):.2f}", f"{statistics.median(cpus):.2f}", heavy[-1]]
            rows.append(cells)
            print(" | ".join(cells), flush=True)
    header = ["command"] + [f"{name} {what}" for name in trees for what in ("wall s", "CPU s", "imports")]
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    )
    text = (
        f"# Start-up time of the command lines\n\n`python benchmarks/startup.py{' --before ' + str(args.before) if args.before else ''} "
        f"--repeats {args.repeats}`: medians of {args.repeats} fresh interpreters per command and tree, alternating; "
        f"{os.cpu_count()} cores shared with other work, load average {load:.1f} at the start, Python "
        f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}. 'imports' lists which of {', '.join(HEAVY)} the "
        f"command loaded (- = neither).\n\n{table}\n"
    )
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
