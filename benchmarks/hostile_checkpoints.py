"""What crafted EDM pickles cost the reader: time and peak resident memory until the one-line refusal.

Each crafted file is written to a temporary folder and read by `load_denoiser('edm_pickle', …)` in a fresh child
process; the child reports the error line, the wall time and the peak RSS growth (VmHWM reset before the load).
Cases: a storage blob that is a deflate zip bomb, a tensor record and a storage header each claiming 10¹⁰
elements (40 GB) over 256 stored ones, a dict key nested 10⁶ deep, a tiny network whose stored init kwargs ask
for 60 000 blocks per level (within the integer bound, so the layer budget has to stop it), and the two most
memory-hungry files the
operation budget still lets run to the end (one new dict, or one memo entry, per operation). With `--baseline`,
one more row shows what the zip-bomb blob costs `torch.load(weights_only=True)`, the reader used before.
Prints a Markdown table and writes it to docs/hostile_checkpoints.md.

    PYTHONPATH=. python benchmarks/hostile_checkpoints.py [--inflate-mib 4096] [--baseline] [--out docs/hostile_checkpoints.md]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, torch_load: bool) -> dict:
    """Runs in a fresh interpreter: read one crafted file and report how it ended."""
    import torch

    from benchmarks.common import peak_rss_growth
    from dode_lightning.checkpoints import load_denoiser

    def attempt() -> str:
        try:
            if torch_load:
                torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)
            else:
                load_denoiser("edm_pickle", path)
        except Exception as err:  # the outcome being measured: which error, how soon, at what memory
            return f"{type(err).__name__}: {err}"
        return "loaded"

    start = time.perf_counter()
    outcome, peak_mib = peak_rss_growth(attempt)
    return {"outcome": outcome, "seconds": time.perf_counter() - start, "peak_mib": peak_mib}


def crafted_files(folder: Path, inflate_mib: int, baseline: bool) -> list[tuple[str, Path, bool]]:
    """(description, path, read with torch.load instead of our reader) for each case."""
    import torch

    from dode_lightning.checkpoints.edm_pickle import MAX_PICKLE_OPERATIONS
    from dode_lightning.checkpoints.edm_writer import StoredTensor, deflated_zip_blob, dumps, legacy_storage_blob, network_record, persistent_record
    from dode_lightning.networks import EDMPrecond

    def snapshot_with(tensor: StoredTensor) -> bytes:
        return dumps({"ema": persistent_record("EDMPrecond", {"_parameters": {"weight": tensor}})})

    tiny = EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    many_blocks = network_record(tiny)
    many_blocks.meta["state"]["_init_kwargs"]["num_blocks"] = 60_000
    bomb = deflated_zip_blob(inflate_mib << 20)
    small = legacy_storage_blob(torch.zeros(256))
    fill = MAX_PICKLE_OPERATIONS - 8
    cases = [
        (f"storage blob: deflate zip bomb inflating to {inflate_mib} MiB", snapshot_with(StoredTensor(bomb, (1,), (1,))), False),
        ("tensor record: 10¹⁰ elements over a 256-element storage", snapshot_with(StoredTensor(small, (10**5, 10**5), (10**5, 1))), False),
        ("storage header: claims 10¹⁰ elements, holds 256", snapshot_with(StoredTensor(legacy_storage_blob(torch.zeros(256), claimed=10**10), (256,), (1,))), False),
        ("dict key: tuple nested 10⁶ deep", b"\x80\x04}" + b")" + b"\x85" * 10**6 + b"K\x01s.", False),
        (f"init kwargs: num_blocks 60 000 on a {len(tiny.state_dict())}-tensor network", dumps({"ema": many_blocks}), False),
        (f"budget worst case: a list of {fill:,} new dicts", b"\x80\x04](" + b"}" * fill + b"e.", False),
        (f"budget worst case: {fill:,} memo entries", b"\x80\x04N" + b"\x94" * fill + b".", False),
    ]
    if baseline:
        cases.append(("the zip-bomb blob read by torch.load(weights_only=True) (the reader before)", bomb, True))
    files = []
    for number, (description, data, torch_load) in enumerate(cases):
        path = folder / f"case{number}.pkl"
        path.write_bytes(data)
        files.append((description, path, torch_load))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflate-mib", type=int, default=4096, help="what the zip bomb inflates to (the issue's file: 4.6 GB)")
    parser.add_argument("--baseline", action="store_true", help="also read the bomb blob with torch.load (allocates the inflated size)")
    parser.add_argument("--out", default="docs/hostile_checkpoints.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--torch-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.torch_load)))
        return

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for description, path, torch_load in crafted_files(Path(folder), args.inflate_mib, args.baseline):
            command = [sys.executable, __file__, "--child", str(path), *(["--torch-load"] if torch_load else [])]
            result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            outcome = stats["outcome"].split(": ", 1)[-1].replace("|", "\\|")
            rows.append(f"| {description} | {path.stat().st_size / 2**20:.2f} MiB | {outcome[:110]} | {stats['seconds']:.2f} s | {stats['peak_mib']:.0f} MiB |")
    table = "| crafted file | size | outcome | time | peak RSS growth |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# What crafted EDM pickles cost the reader\n\n"
        "Measured by `benchmarks/hostile_checkpoints.py` (each file read by `load_denoiser` in a fresh process; peak "
        "resident memory from /proc/self/status VmHWM, reset before the read). A fresh process pays for torch's lazily "
        "imported modules on first use: the init-kwargs row is mostly that (building on the meta device for the first "
        "time), not the 536 registrations the layer budget allowed.\n\n" + table
    )


if __name__ == "__main__":
    main()
