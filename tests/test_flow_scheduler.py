"""DODEScheduler on flow-matching configs inside tiny SD3 and FLUX pipelines (issue 20 item 4)."""
import pytest
import torch

from dode_lightning.checkpoints import load_denoiser
from dode_lightning.checkpoints.flow_pipeline import pack_latents, unpack_latents
from dode_lightning.diffusers_scheduler import DODEScheduler, export_scheduler
from dode_lightning.lambda_file import save_lambdas
from dode_lightning.lightning import build_student
from dode_lightning.scheduler_config import SchedulerConfigError
from tests.pipelines import write_flow_prompt_embeds, write_tiny_flux_pipeline, write_tiny_sd3_pipeline

NO_TEXT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("flow-scheduler")
    embeds = write_flow_prompt_embeds(root / "embeds.safetensors")
    tensors = load_file(str(embeds))
    cond = dict(prompt_embeds=tensors["prompt_embeds"][1:2], pooled_prompt_embeds=tensors["pooled_prompt_embeds"][1:2], height=16, width=16, output_type="latent")
    negative = dict(negative_prompt_embeds=tensors["negative_prompt_embeds"], negative_pooled_prompt_embeds=tensors["negative_pooled_prompt_embeds"])
    found = {"embeds": embeds}
    for name, folder, dynamic in (("sd3", "tiny-sd3", False), ("sd3_dynamic", "tiny-sd3-dynamic", True)):
        path = write_tiny_sd3_pipeline(root / folder, dynamic=dynamic)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, **NO_TEXT)
        found[name] = (path, pipe, {**cond, **negative, **({"mu": 0.8} if dynamic else {})})
    path = write_tiny_flux_pipeline(root / "tiny-flux")
    found["flux"] = (path, FluxPipeline.from_pretrained(path, **NO_TEXT), cond)
    for _, pipe, _ in (found["sd3"], found["sd3_dynamic"], found["flux"]):
        pipe.set_progress_bar_config(disable=True)
    return found


def run(pipe, scheduler, kind, noise, steps, call):
    """Final latents (unpacked) of a pipeline run with `scheduler` from the given unit-noise latents."""
    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        latents = pack_latents(noise) if kind == "flux" else noise
        out = pipe(num_inference_steps=steps, latents=latents.clone(), **call).images
    finally:
        pipe.scheduler = original
    return unpack_latents(out, *noise.shape[-2:]) if kind == "flux" else out


@pytest.mark.parametrize("kind", ["sd3", "sd3_dynamic", "flux"])
def test_without_lambdas_it_is_flow_match_euler(pipes, kind):
    _, pipe, call = pipes[kind]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    config = pipe.scheduler.config
    for steps in (4, 8):
        theirs = run(pipe, pipe.scheduler, kind, noise, steps, call)
        ours = run(pipe, DODEScheduler.from_config(config), kind, noise, steps, call)
        diff = float((ours - theirs).norm() / theirs.norm())
        print(f"\n{kind}: FlowMatchEulerDiscreteScheduler vs DODEScheduler (euler, λ ≡ 0), {steps} steps: relative |Δ| = {diff:.1e}")
        assert diff <= 1e-5


def test_flow_set_timesteps_arguments(pipes):
    _, pipe, _ = pipes["flux"]
    scheduler = DODEScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.solver == "euler"
    with pytest.raises(SchedulerConfigError, match="pass mu="):
        scheduler.set_timesteps(4)
    with pytest.raises(SchedulerConfigError, match="descending from 1"):
        scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.2], mu=0.5)
    with pytest.raises(SchedulerConfigError, match="descending from 1"):
        scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.6], mu=0.5)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.5)
    assert scheduler.init_noise_sigma == 1.0 and len(scheduler.timesteps) == 4 and float(scheduler.timesteps[0]) == 1000.0
    with pytest.raises(SchedulerConfigError, match="img2img"):
        scheduler.scale_noise(torch.zeros(1, 4), scheduler.timesteps[:1], torch.zeros(1, 4))
    with pytest.raises(SchedulerConfigError, match="begin_index 0"):
        scheduler.set_begin_index(2)


def test_exported_calibrated_scheduler_gives_the_solvers_images(pipes, tmp_path):
    """A λ file fitted on the tiny FLUX pipeline, exported, inside FluxPipeline: the latents and the uint8 images of
    `Solver.sample` on the loaded guided denoiser (what sample.py writes)."""
    from dode_lightning.sampling import to_uint8

    folder, pipe, call = pipes["flux"]
    denoiser = {"source": "diffusers_pipeline", "path": str(folder), "prompt_embeds": str(pipes["embeds"]), "height": 16, "width": 16}
    built = build_student(denoiser, "euler", 6)
    lambdas = torch.linspace(-0.3, 0.4, built.solver.num_stages, dtype=torch.float64)
    lambdas[0] = 0.0
    path = save_lambdas(tmp_path / "lambdas.safetensors", {"lambdas": lambdas, "sigmas": built.solver.sigmas}, built.metadata())
    scheduler = export_scheduler(path, folder)
    scheduler.save_pretrained(tmp_path / "scheduler")
    scheduler = DODEScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.calibrated_steps == 6
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ours = run(pipe, scheduler, "flux", noise, 6, call)
    labels = torch.nn.functional.one_hot(torch.tensor([1]), 3).double()
    with torch.no_grad():
        final = built.solver.sample(built.loaded.denoiser, noise.double(), lambdas, labels)
        base = built.solver.sample(built.loaded.denoiser, noise.double(), None, labels)
        images = [to_uint8(built.loaded.decoder(x)) for x in (ours, final)]
    assert float((ours - final).norm() / final.norm()) < 1e-5
    assert float((base - final).norm() / final.norm()) > 1e-3  # λ changed the result
    assert torch.equal(images[0], images[1])
    with pytest.raises(SchedulerConfigError, match="λ were fitted on the grid"):
        run(pipe, scheduler, "flux", noise, 8, call)


@pytest.mark.slow
def test_train_sample_export_on_a_tiny_flux_pipeline_gives_sample_pys_pngs(pipes, tmp_path):
    """train.py → sample.py PNGs → sample.py export-scheduler → FluxPipeline with that scheduler: the same uint8 images."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from dode_lightning.distill import seeded_noise
    from dode_lightning.images import to_uint8
    from dode_lightning.sampling import ImageStore

    root = Path(__file__).resolve().parents[1]
    folder, pipe, call = pipes["flux"]
    config = tmp_path / "flux.yaml"
    config.write_text(
        "seed_everything: 0\ntrainer: {accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false}\n"
        f"model:\n  denoiser: {{source: diffusers_pipeline, path: {folder}, prompt_embeds: {pipes['embeds']}, height: 16, width: 16}}\n"
        "  solver: euler\n  nfe: 4\n  history: 4\n"
        f"data: {{scale: 4, batch_size: 8, seed: 0, cache_dir: {tmp_path / 'cache'}}}\n"
    )

    def cli(script, *args):
        result = subprocess.run([sys.executable, str(root / script), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    cli("train.py", "--config", str(config), "--model.output", str(tmp_path / "l.safetensors"))
    cli("sample.py", "--config", str(config), "--lambdas", str(tmp_path / "l.safetensors"), "--seeds", "0-3", "--outdir", str(tmp_path / "out"))
    cli("sample.py", "export-scheduler", "--lambdas", str(tmp_path / "l.safetensors"), "--pipeline", str(folder), "--out", str(tmp_path / "scheduler"))
    scheduler = DODEScheduler.from_pretrained(tmp_path / "scheduler")
    loaded = load_denoiser("diffusers_pipeline", path=folder, prompt_embeds=str(pipes["embeds"]), height=16, width=16)
    noise, labels = seeded_noise(range(4), loaded.image_shape, loaded.label_dim, torch.float32)
    embeds = loaded.denoiser.velocity_model
    store = ImageStore(tmp_path / "out")
    differences = []
    for seed in range(4):
        prompt = int(labels[seed].argmax())
        conditioning = {**call, "prompt_embeds": embeds.prompt_embeds[prompt : prompt + 1], "pooled_prompt_embeds": embeds.pooled_prompt_embeds[prompt : prompt + 1]}
        latents = run(pipe, scheduler, "flux", noise[seed : seed + 1], 4, conditioning)
        with torch.no_grad():
            ours = to_uint8(loaded.decoder(latents))[0].numpy()
        written = np.asarray(Image.open(store.png_path(seed))).transpose(2, 0, 1)
        differences.append(np.abs(ours.astype(int) - written.astype(int)))
    mismatch = np.stack(differences)
    print(f"\ntiny FLUX, D-Euler h-all NFE 4: exported scheduler in FluxPipeline vs sample.py PNGs: max |Δ| = {mismatch.max()} (uint8), {(mismatch > 0).mean():.1e} of values differ")
    assert mismatch.max() <= 1 and (mismatch > 0).mean() < 1e-3
