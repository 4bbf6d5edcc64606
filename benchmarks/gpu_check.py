"""GPU check, for the day a GPU is available (not part of CI): calibration and sampling on CUDA against the CPU.

1. The FFHQ-64 DDPM++ layout (EDMPrecond + SongUNet, 62 M parameters, random weights, seeded): D-EDM (Heun, NFE 9)
   calibrated against a 10× Euler teacher (closed form) on the same seeds on the CPU and on CUDA; λ and samples
   compared; calibration time, images/s of the base and the D-solver, and peak CUDA memory at `--batch`.
2. `DODEScheduler` in a tiny `DDPMPipeline` (random UNet2DModel, diffusers): λ fitted by train.py on the CPU,
   exported with `export_scheduler`, the pipeline run on CUDA and on the CPU from the same CPU generator.

Usage: python benchmarks/gpu_check.py [--batch 64] [--device cuda]
Without CUDA it prints one line and exits 0. `--device cpu` runs every step on the CPU at toy size (a smoke run of
the script itself; the figures then mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import FFHQ_DDPMPP, markdown_table  # noqa: E402
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, seeded_noise, teacher_targets  # noqa: E402
from dode_lightning.networks import EDMPrecond  # noqa: E402
from dode_lightning.schedules import EDM  # noqa: E402

# The toy layout of `--device cpu`: the same code paths in seconds.
TOY_DDPMPP = {**FFHQ_DDPMPP, "img_resolution": 8, "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "augment_dim": 0}
# Relative differences CUDA vs CPU above this are flagged (float32 network; TF32 convolutions on Ampere and newer).
TOLERANCE = 2e-2


def timed(device: torch.device, run: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds) of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def calibrate(net: EDMPrecond, noise: torch.Tensor, device: torch.device, scale: int) -> tuple[torch.Tensor, float]:
    """λ of D-EDM NFE 9 on these latents (closed form against the C× Euler teacher) and the seconds it took."""
    setup = SolverSetup.resolve("heun", 9, EDM(0.002, 80.0))
    student = setup.build()
    teacher, indices = build_teacher(student, setup, scale)
    net, noise = net.to(device), noise.to(device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            targets = teacher_targets(teacher, indices, net, noise)
        return fit_closed_form(student, net, noise, targets).lambdas

    lambdas, seconds = timed(device, run)
    return lambdas.cpu(), seconds


def sample(net: EDMPrecond, noise: torch.Tensor, device: torch.device, lambdas: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    student = SolverSetup.resolve("heun", 9, EDM(0.002, 80.0)).build()
    net, noise = net.to(device), noise.to(device)
    with torch.no_grad():
        images, seconds = timed(device, lambda: student.sample(net, noise, None if lambdas is None else lambdas.to(device)))
    return images.cpu(), seconds


def ffhq_check(device: torch.device, batch: int, toy: bool) -> list[list[str]]:
    torch.manual_seed(0)
    net = EDMPrecond(**(TOY_DDPMPP if toy else FFHQ_DDPMPP)).eval().requires_grad_(False)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    compare, _ = seeded_noise(range(4), shape, dtype=torch.float32)  # small: the CPU runs it too
    cpu = torch.device("cpu")
    lam_cpu, cpu_seconds = calibrate(net, compare, cpu, scale=2)
    lam_dev, dev_seconds = calibrate(net, compare, device, scale=2)
    rows = [["calibration λ, |B| = 4, C = 2", f"{relative(lam_dev, lam_cpu):.2e}", f"CPU {cpu_seconds:.1f} s, {device.type} {dev_seconds:.2f} s"]]
    d_cpu, _ = sample(net, compare, cpu, lam_cpu)
    d_dev, _ = sample(net, compare, device, lam_dev)
    rows.append(["D-EDM samples, 4 seeds", f"{relative(d_dev, d_cpu):.2e}", "each device with its own λ"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    noise, _ = seeded_noise(range(100, 100 + batch), shape, dtype=torch.float32)
    scale = 2 if toy else 10
    lambdas, seconds = calibrate(net, noise, device, scale=scale)
    rows.append([f"calibration, |B| = {batch}, C = {scale} (teacher NFE {9 * scale})", "", f"{seconds:.2f} s"])
    for name, lam in (("base Heun NFE 9", None), ("D-Heun NFE 9", lambdas)):
        sample(net, noise, device, lam)  # warm-up (cuDNN autotuning, allocator)
        _, seconds = sample(net, noise, device, lam)
        rows.append([f"sampling {name}, batch {batch}", "", f"{batch / seconds:.1f} images/s"])
    if device.type == "cuda":
        rows.append(["peak CUDA memory (calibration + sampling)", "", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"])
    return rows


def scheduler_check(device: torch.device) -> list[list[str]]:
    """train.py on a tiny DDPM folder (CPU) → export_scheduler → DDPMPipeline on the device and on the CPU."""
    try:
        import diffusers
    except ImportError:
        return [["DODEScheduler in DDPMPipeline", "", "skipped: diffusers is not installed (pip install -e '.[diffusers]')"]]
    from dode_lightning import export_scheduler
    from dode_lightning.cli import train_main

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    with tempfile.TemporaryDirectory() as tmp:
        folder, lambdas = Path(tmp) / "pipeline", Path(tmp) / "lambdas.safetensors"
        pipe.save_pretrained(folder)
        config = Path(tmp) / "c.yaml"
        config.write_text(
            f"trainer: {{logger: false, accelerator: cpu, enable_progress_bar: false}}\n"
            f"model: {{denoiser: {json.dumps({'source': 'diffusers', 'path': str(folder)})}, solver: ddim, nfe: 4, state_dtype: float32, output: {json.dumps(str(lambdas))}}}\n"
            "data: {scale: 2, batch_size: 2, class_conditional: false, cache_dir: null}\n"
        )
        with contextlib.redirect_stdout(io.StringIO()):
            code = train_main(["--config", str(config)])
        if code != 0:
            return [["DODEScheduler in DDPMPipeline", "", f"train.py failed with exit code {code}"]]
        scheduler = export_scheduler(lambdas, folder)
    results = {}
    for target in (torch.device("cpu"), device):
        pipe.scheduler = scheduler
        pipe.to(target)
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            output, seconds = timed(target, lambda: pipe(batch_size=4, generator=generator, num_inference_steps=4, output_type="np").images)
        results[target.type] = (torch.from_numpy(output), seconds)
    (cpu_images, cpu_seconds), (dev_images, dev_seconds) = results["cpu"], results[device.type]
    return [["DODEScheduler (D-DDIM NFE 4) in DDPMPipeline, 4 images", f"{relative(dev_images, cpu_images):.2e}", f"CPU {cpu_seconds:.2f} s, {device.type} {dev_seconds:.2f} s"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a toy-size smoke run of this script)")
    parser.add_argument("--batch", type=int, default=64, help="calibration batch |B| and sampling batch on the device")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); nothing checked (run it on a GPU machine, or --device cpu for a smoke run)")
        return 0
    device = torch.device(args.device)
    toy = device.type == "cpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy smoke run)"
    batch = min(args.batch, 4) if toy else args.batch
    rows = ffhq_check(device, batch, toy) + scheduler_check(device)
    flagged = [row[0] for row in rows if row[1] and not (math.isfinite(float(row[1])) and float(row[1]) <= TOLERANCE)]
    print(f"\n{name}, torch {torch.__version__}; {'toy DDPM++' if toy else 'FFHQ-64 DDPM++ (62 M parameters), random weights'}")
    print(markdown_table(["check", f"max rel. diff {device.type} vs CPU", "figure"], rows))
    if flagged:
        print(f"MISMATCH above {TOLERANCE:g}: {', '.join(flagged)}")
        return 1
    print(f"all device results within {TOLERANCE:g} of the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
