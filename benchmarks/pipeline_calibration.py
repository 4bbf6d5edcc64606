"""Calibration cost on a tiny latent, text-conditional pipeline with classifier-free guidance (`diffusers_pipeline`).

A random-weight StableDiffusionPipeline folder (tests/pipelines.py: UNet on 4×8×8 latents, CLIP text encoder of
width 16) is written to a temporary folder and loaded through the `diffusers_pipeline` source. For each guidance
scale: D-DDIM at NFE 10 against the 10× DDIM teacher (C = 10, |B| = 100, aligned targets), CPU time of the teacher
and of the closed-form fit, the same in units of sampling |B| images with the 10-step base DDIM, and the per-stage
loss sum of the D-solver relative to the base solver on the calibration seeds and on 100 held-out seeds (other
prompts). The network is tiny, so the times measure the machinery around it (guided UNet calls on the doubled batch,
prompt lookup), not what a real Stable Diffusion UNet costs; the ratio to sampling carries over.
Usage: PYTHONPATH=. python benchmarks/pipeline_calibration.py [--quick] [--out-dir docs]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import HELD_OUT_START, machine, markdown_table, output_dir, parser, write_section
from dode_lightning.checkpoints import load_denoiser
from dode_lightning.distill import StageFit, SolverSetup, build_teacher, evaluate_lambdas, fit_closed_form, seeded_noise, teacher_targets
from tests.pipelines import write_tiny_sd_pipeline

PROMPTS = [
    "a photograph of an astronaut riding a horse", "a red bicycle against a brick wall", "a bowl of fruit",
    "a lighthouse at sunset", "a cat on a windowsill", "a street market in the rain", "a mountain lake", "a hummingbird",
]


def loss_ratio(fit: StageFit) -> float:
    """Per-stage loss sum of the D-solver over the base solver's (1 = no gain)."""
    return float(fit.loss_fit.sum() / fit.loss_base.sum())


def cpu_seconds(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    result = run()
    return result, time.process_time() - start


def measure(folder: Path, guidance: float, nfe: int, scale: int, batch: int) -> list[str]:
    loaded = load_denoiser("diffusers_pipeline", folder, prompts=PROMPTS, guidance_scale=guidance)
    setup = SolverSetup.resolve("ddim", nfe, loaded.schedule)
    student = setup.build()
    teacher, indices = build_teacher(student, setup, scale)
    sampler = SolverSetup.resolve("ddim", 10, loaded.schedule).build()

    def draw(first: int):
        return seeded_noise(range(first, first + batch), loaded.image_shape, loaded.label_dim, torch.float32)

    noise, labels = draw(0)
    with torch.no_grad():
        targets, teacher_s = cpu_seconds(lambda: teacher_targets(teacher, indices, loaded.denoiser, noise, labels))
        fit, fit_s = cpu_seconds(lambda: fit_closed_form(student, loaded.denoiser, noise, targets, labels))
        _, sample_s = cpu_seconds(lambda: sampler.sample(loaded.denoiser, noise, class_labels=labels))
        held_noise, held_labels = draw(HELD_OUT_START)
        held_targets = teacher_targets(teacher, indices, loaded.denoiser, held_noise, held_labels)
        held = evaluate_lambdas(student, loaded.denoiser, held_noise, held_targets, fit.lambdas, held_labels)
    return [
        f"{guidance:g}", f"{teacher.nfe}", f"{teacher_s:.2f}", f"{fit_s:.2f}", f"{sample_s:.2f}",
        f"{(teacher_s + fit_s) / sample_s:.1f}×", f"{loss_ratio(fit):.3f}", f"{loss_ratio(held):.3f}",
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    nfe, scale, batch = (4, 3, 8) if args.quick else (10, 10, 100)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_sd_pipeline(Path(tmp) / "tiny-sd")
        rows = [measure(folder, guidance, nfe, scale, batch) for guidance in (1.0, 7.5)]
    header = ["guidance w", "teacher NFE", "teacher CPU s", "fit CPU s", "10-step DDIM on |B| CPU s",
              "(teacher + fit) / sampling", "loss D/base (calibration)", "loss D/base (held-out)"]
    table = markdown_table(header, rows)
    text = (
        "## Calibration cost on a tiny latent pipeline with classifier-free guidance\n\n"
        f"`PYTHONPATH=. python benchmarks/pipeline_calibration.py{' --quick' if args.quick else ''}`: D-DDIM NFE {nfe}, "
        f"C = {scale}, |B| = {batch}, random-weight StableDiffusionPipeline (4×8×8 latents), {len(PROMPTS)} prompts drawn per "
        f"seed; CPU seconds on {machine()}. Each guided evaluation (w > 1) is one UNet call on the doubled batch.\n\n"
        + table
    )
    print(table)
    out = output_dir(args)
    if out is not None:
        write_section(out, "pipeline_calibration", text)


if __name__ == "__main__":
    main()
