"""Load cost of a full-size EDM network pickle: FFHQ-64 DDPM++ (edm-ffhq-64x64-uncond-vp.pkl layout), random weights.

Writes the snapshot with our EDM-format writer, then, in a fresh child process (so imports and the writer do not
pollute the numbers), measures `load_denoiser('edm_pickle', ...)`: wall time (restricted unpickling, sha256 of the
file, rebuild and strict load), peak resident-memory growth (VmHWM after − VmRSS before) against the file size,
and one forward pass at batch 1 on CPU. Prints a Markdown table and writes it to docs/checkpoint_load.md.

    PYTHONPATH=. python benchmarks/checkpoint_load.py [--out docs/checkpoint_load.md] [--keep PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_PARAMS_M = 61.81


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process. VmHWM restarts at exec, unlike ru_maxrss,
    which a child inherits from the parent it was forked from."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str) -> dict:
    """Runs in a fresh interpreter: load, then time a forward pass."""
    import torch

    from dode_lightning.checkpoints import load_denoiser

    rss_before = _status_mib("VmRSS")
    start = time.perf_counter()
    loaded = load_denoiser("edm_pickle", path)
    load_s = time.perf_counter() - start
    peak_mib = _status_mib("VmHWM")
    rss_after = _status_mib("VmRSS")

    x = torch.randn(1, *loaded.image_shape, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    times: dict[int, list[float]] = {}
    with torch.no_grad():
        for count in (threads, 1):
            torch.set_num_threads(count)
            times[count] = []
            for _ in range(4):
                start = time.perf_counter()
                out = loaded.denoiser(x, 2.5)
                times[count].append(time.perf_counter() - start)
    assert torch.isfinite(out).all()
    return dict(
        load_s=load_s, rss_before_mib=rss_before, peak_growth_mib=peak_mib - rss_before, rss_growth_mib=rss_after - rss_before,
        forward_first_s=times[threads][0], forward_s=sorted(times[threads][1:])[1], forward_1thread_s=sorted(times[1][1:])[1],
        threads=threads,
        params=sum(p.numel() for p in loaded.denoiser.parameters()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/checkpoint_load.md")
    parser.add_argument("--keep", default=None, help="write the pickle here and keep it")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    import torch

    from benchmarks.common import FFHQ_DDPMPP
    from dode_lightning.checkpoints.edm_writer import write_edm_snapshot
    from dode_lightning.networks import EDMPrecond

    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.keep or Path(folder) / "edm-ffhq-64x64-uncond-vp-random.pkl")
        torch.manual_seed(0)
        net = EDMPrecond(**FFHQ_DDPMPP).eval().requires_grad_(False)
        params = sum(p.numel() for p in net.parameters())
        start = time.perf_counter()
        write_edm_snapshot(path, net)
        write_s = time.perf_counter() - start
        del net
        size_mib = path.stat().st_size / 2**20
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
        result = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True, text=True, env=env)
        stats = json.loads(result.stdout.strip().splitlines()[-1])

    assert stats["params"] == params
    rows = [
        ("network", "EDMPrecond + SongUNet DDPM++, 64×64, channel_mult [1,2,2,2], 4 blocks, attn 16 (edm-ffhq-64x64-uncond-vp layout), random weights"),
        ("parameters", f"{params / 1e6:.2f} M (EDM's classes give {PAPER_PARAMS_M} M for this config, checkpoints.md §8)"),
        ("file size", f"{size_mib:.1f} MiB"),
        ("write time (our test writer)", f"{write_s:.2f} s"),
        ("load time (`load_denoiser`: restricted unpickle + sha256 + rebuild + strict load)", f"{stats['load_s']:.2f} s"),
        ("peak RSS growth during load", f"{stats['peak_growth_mib']:.0f} MiB ({stats['peak_growth_mib'] / size_mib:.2f}× file size)"),
        ("RSS growth retained after load", f"{stats['rss_growth_mib']:.0f} MiB ({stats['rss_growth_mib'] / size_mib:.2f}× file size)"),
        ("forward pass, batch 1, CPU float32 (first call)", f"{stats['forward_first_s'] * 1e3:.0f} ms"),
        ("forward pass, batch 1, CPU float32 (median of 3 after)", f"{stats['forward_s'] * 1e3:.0f} ms"),
        ("same, 1 thread (median of 3 after a warm-up)", f"{stats['forward_1thread_s'] * 1e3:.0f} ms"),
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {stats['threads']} threads by default"),
    ]
    table = "| quantity | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Loading a full-size EDM network pickle\n\n"
        "Measured by `benchmarks/checkpoint_load.py` (load in a fresh process; resident memory from /proc/self/status VmRSS/VmHWM).\n\n" + table
    )


if __name__ == "__main__":
    main()
