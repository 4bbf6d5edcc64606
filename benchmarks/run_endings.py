"""Figures of issue 21 items 12 and 15: what a crafted npz shard costs the resume check, and how fast the surviving
rank of a two-process DDP sampling run stops when the other one is killed.

Shard: a compressed shard (3.5 MB on disk) whose `images` member inflates to 3.6 GB of zeros, in a sample.py outdir
of the built-in model. Measured in fresh interpreters: `np.load(...)["images"]` (what the resume check did before:
it inflated every member) and `ImageStore.scan` (now: member headers only); wall seconds and peak RSS above the
interpreter's baseline after the imports.
DDP: `sample.py --trainer.devices 2 --trainer.strategy ddp` (gloo on CPU, --batch-size 1) on the built-in model; once
20 PNGs exist, rank 1 (or rank 0) gets SIGKILL; reported: seconds until the survivor has ended, PNGs it wrote after
the kill, and its last stderr line.
Usage: PYTHONPATH=. python benchmarks/run_endings.py [--repeats 2] [--skip-inflate] [--out docs/run_endings.md]
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLAIMED_SHAPE = (1, 30000, 30000, 4)  # 3.6 GB of uint8 zeros: deflate packs them into ≈ 3.5 MB
_MEASURE = (
    "import resource, sys, time, warnings\n"
    "import numpy as np\n"
    "from dode_lightning.sampling import ImageStore\n"
    "warnings.simplefilter('ignore')\n"
    "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "start = time.perf_counter()\n"
    "if sys.argv[1] == 'inflate':\n    np.load(sys.argv[2] + '/npz/seeds-000001-n1.npz')['images']\n"
    "else:\n    ImageStore(sys.argv[2], 'npz').scan([1], (1, 8, 8))\n"
    "print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
)


def crafted_shard(outdir: Path) -> Path:
    """The compressed shard: seeds [1], labels [-1], images claiming CLAIMED_SHAPE (all zeros)."""
    path = outdir / "npz" / "seeds-000001-n1.npz"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in (("seeds", np.array([1])), ("labels", np.array([-1]))):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())
        with archive.open("images.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": CLAIMED_SHAPE})
            left, block = int(np.prod(CLAIMED_SHAPE)), bytes(1 << 24)
            while left:
                member.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def shard_rows(work: Path, skip_inflate: bool) -> list[str]:
    outdir = work / "shard-out"
    size = crafted_shard(outdir).stat().st_size
    rows = []
    for mode, label in (("inflate", "np.load of the images member (the check before)"), ("scan", "ImageStore.scan (headers only)")):
        if mode == "inflate" and skip_inflate:
            continue
        out = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(outdir)], env=_env(), capture_output=True, text=True, check=True).stdout.split()
        rows.append(f"| {label} | {size / 1e6:.1f} MB | {float(out[0]):.2f} | {float(out[1]):.0f} |")
    return rows


def ddp_row(work: Path, victim: int) -> str:
    outdir = work / f"ddp-{victim}-{time.monotonic_ns()}"
    command = [
        sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "gmm_digits.yaml"), "--lambdas", "none",
        "--seeds", "0-99999", "--outdir", str(outdir), "--batch-size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false",
    ]
    process = subprocess.Popen(command, cwd=work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list(outdir.rglob("*.png"))) < 20:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read())
        time.sleep(0.05)
    child = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
    survivor = process.pid if victim == 1 else child
    os.kill(child if victim == 1 else process.pid, signal.SIGKILL)
    killed, before = time.monotonic(), len(list(outdir.rglob("*.png")))
    if victim == 1:
        process.wait()
    else:  # the launched rank is not our child: wait until it is gone (or a zombie of its dead parent)
        status = Path(f"/proc/{survivor}/status")
        while status.exists() and "zombie" not in status.read_text():
            time.sleep(0.005)
    seconds = time.monotonic() - killed
    line = process.communicate()[1].strip().splitlines()[-1]
    return f"| rank {victim} | {seconds:.2f} | {len(list(outdir.rglob('*.png'))) - before} | `{line[:90]}…` |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="DDP runs per victim")
    parser.add_argument("--skip-inflate", action="store_true", help="do not measure the 3.6 GB inflation")
    parser.add_argument("--out", default=str(ROOT / "docs" / "run_endings.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shards = shard_rows(work, args.skip_inflate)
        ddp = [ddp_row(work, victim) for victim in (1, 0) for _ in range(args.repeats)]
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Runs that end badly: figures (benchmarks/run_endings.py)",
        "",
        f"Machine: {os.cpu_count()} cores, load average {load:.1f} at the end of the run.",
        "",
        "## A crafted compressed npz shard in one's own outdir (issue 21 item 15)",
        "",
        "| check | shard on disk | seconds | peak RSS above baseline (MiB) |",
        "|---|---|---|---|",
        *shards,
        "",
        "## One of two DDP ranks killed (SIGKILL) mid-run (issue 21 item 12)",
        "",
        "| killed | survivor ended after (s) | PNGs written after the kill | survivor's last line |",
        "|---|---|---|---|",
        *ddp,
        "",
    ])
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
