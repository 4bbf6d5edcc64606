"""The `diffusers_pipeline` source: tiny random-weight StableDiffusionPipeline folders written here with
save_pretrained (no hub), classifier-free guidance as the pipeline computes it, CFG calibration, train.py and
sample.py end to end, and the DDPMPipeline fixture folder."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dode_lightning.checkpoints import CheckpointError, load_denoiser
from dode_lightning.cli import train_main
from dode_lightning.distill import SolverSetup, build_teacher, evaluate_lambdas, fit_closed_form, seeded_noise, teacher_targets
from dode_lightning.lambda_file import load_lambdas
from dode_lightning.sample_cli import sample_main
from tests.conftest import fixture_path
from tests.pipelines import MAX_TOKENS, write_tiny_sd_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPTS = ["a red cat", "a blue dog", "green trees at night", "an old boat", "a bird on a wire", "two cups of tea"]
GUIDANCE = 5.0


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd-v", "v_prediction")


def _load(folder, **options):
    return load_denoiser("diffusers_pipeline", folder, **{"prompts": PROMPTS, "guidance_scale": GUIDANCE, **options})


def test_latent_pipeline_fields(tiny_sd):
    loaded = _load(tiny_sd)
    assert loaded.image_shape == (4, 8, 8) and loaded.output_shape == (3, 16, 16) and loaded.label_dim == len(PROMPTS)
    assert loaded.conditioning["guidance_scale"] == GUIDANCE and isinstance(loaded.conditioning["guidance_scale"], float)
    assert loaded.conditioning["prompts"]["count"] == len(PROMPTS) and loaded.conditioning["prompts"]["source"] == "list"
    assert len(loaded.identity) == 64 and loaded.identity == _load(tiny_sd, guidance_scale=2.0).identity
    assert _load(tiny_sd, prompts=PROMPTS[:2]).conditioning["prompts"]["sha256"] != loaded.conditioning["prompts"]["sha256"]
    assert not any(p.requires_grad for p in loaded.denoiser.parameters())
    with torch.no_grad():
        images = loaded.decoder(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 16, 16)


def _pipeline_first_step(folder, prompt: str, latents: torch.Tensor):
    """(t, latents before, latents after) of the first DDIM step of the real StableDiffusionPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # as SD v1 configures it
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def after_step(pipeline, step, t, kwargs):
        seen.setdefault("t", int(t))
        seen.setdefault("after", kwargs["latents"].clone())
        return kwargs

    pipe(prompt, height=16, width=16, num_inference_steps=4, guidance_scale=GUIDANCE, latents=latents.clone(),
         output_type="latent", callback_on_step_end=after_step)
    return seen["t"], pipe.scheduler.alphas_cumprod, seen["after"]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guided_denoiser_equals_the_pipeline_step(tiny_sd, tiny_sd_v, prediction):
    """Our guided denoiser, put into one DDIM step, lands where StableDiffusionPipeline's own step lands."""
    folder = tiny_sd if prediction == "epsilon" else tiny_sd_v
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, alphas_cumprod, after = _pipeline_first_step(folder, PROMPTS[2], latents)
    loaded = _load(folder)
    schedule = loaded.schedule
    sigma = schedule.sigma(torch.tensor(float(t)))
    x_ve = latents.double() * torch.sqrt(1 + sigma**2)
    onehot = torch.eye(len(PROMPTS), dtype=torch.float64)[[2]]
    with torch.no_grad():
        x0 = loaded.denoiser(x_ve, sigma, onehot)
    eps = (x_ve - x0) / sigma
    prev = float(alphas_cumprod[t - 1000 // 4])
    ours = prev**0.5 * x0 + (1 - prev) ** 0.5 * eps  # DDIM (η = 0) from t to t − 250
    torch.testing.assert_close(ours.float(), after, rtol=0, atol=2e-5)
    with torch.no_grad():
        unguided = _load(folder, guidance_scale=1.0).denoiser(x_ve, sigma, onehot)
    assert (unguided - x0).abs().max() > 1e-3  # guidance changes the result: the comparison above can fail


def test_unet_batch_splits_the_guided_call(tiny_sd):
    whole, split = _load(tiny_sd), _load(tiny_sd, unet_batch=2)
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.eye(len(PROMPTS), dtype=torch.float64)[[0, 3, 1, 5, 2]]
    with torch.no_grad():
        # float32 kernels differ in the last bits between batch shapes, amplified by w = 5
        torch.testing.assert_close(split.denoiser(x, 1.5, labels), whole.denoiser(x, 1.5, labels), rtol=0, atol=1e-4)


def test_prompt_embeds_file_equals_prompts(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    file = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": embeds.contiguous(), "negative_prompt_embeds": negative[:1].contiguous()}, str(file))
    # A folder without tokenizer and text encoder works with precomputed embeddings.
    stripped = tmp_path / "sd-no-text"
    shutil.copytree(tiny_sd, stripped, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    from_embeds = _load(stripped, prompts=None, prompt_embeds=str(file))
    from_prompts = _load(tiny_sd)
    x = torch.randn(len(PROMPTS), 4, 8, 8, dtype=torch.float64)
    labels = torch.eye(len(PROMPTS), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(from_embeds.denoiser(x, 3.0, labels), from_prompts.denoiser(x, 3.0, labels), rtol=0, atol=1e-5)
    assert from_embeds.conditioning["prompts"]["source"] == "embeds:embeds.safetensors"


def test_prompt_file(tiny_sd, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(PROMPTS) + "\n\n")
    loaded = _load(tiny_sd, prompts=str(file))
    assert loaded.label_dim == len(PROMPTS) and loaded.conditioning["prompts"]["source"] == f"file:{file}"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompts": None}, "exactly one of prompts"),
        ({"prompt_embeds": "x.safetensors"}, "exactly one of prompts"),
        ({"prompts": []}, "is empty"),
        ({"guidance_scale": 0.5}, "guidance_scale must be"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be"),
        ({"prompts": [1, 2]}, "list of strings"),
        ({"prompts": "missing.txt"}, "prompt file"),
        ({"guidance_scale": "7.5"}, "guidance_scale must be"),
        ({"unet_batch": 0}, "unet_batch must be"),
        ({"negative_prompt": None}, "negative_prompt must be"),
        ({"prompts": None, "prompt_embeds": "e.safetensors", "negative_prompt": "blurry"}, "negative_prompt needs"),
    ],
)
def test_bad_options_are_refused(tiny_sd, options, message):
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        _load(tiny_sd, **options)


def test_bad_folders_are_refused(tiny_sd, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        _load(tmp_path / "absent")
    other = tmp_path / "xl"
    shutil.copytree(tiny_sd, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(CheckpointError, match="not supported"):
        _load(other)
    huge = tmp_path / "huge"
    shutil.copytree(tiny_sd, huge)
    unet_config = json.loads((huge / "unet" / "config.json").read_text())
    (huge / "unet" / "config.json").write_text(json.dumps({**unet_config, "sample_size": 1 << 40}))
    with pytest.raises(CheckpointError, match="unet/config.json: sample_size is"):
        _load(huge)  # refused before the UNet is built
    torn = tmp_path / "torn"
    shutil.copytree(tiny_sd, torn)
    weights = torn / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable weights"):
        _load(torn)


def test_cfg_calibration_reduces_held_out_loss(tiny_sd):
    """λ fitted on the guided latent denoiser (teacher: the same guided denoiser, C× steps) lower the per-stage loss
    on held-out seeds that draw other prompts."""
    loaded = _load(tiny_sd)
    setup = SolverSetup.resolve("ddim", 5, loaded.schedule)
    student = setup.build()
    teacher, indices = build_teacher(student, setup, 5)

    def batch(seeds):
        noise, labels = seeded_noise(seeds, loaded.image_shape, loaded.label_dim)
        with torch.no_grad():
            return noise, labels, teacher_targets(teacher, indices, loaded.denoiser, noise, labels)

    calibration, held_out = batch(range(0, 12)), batch(range(5000, 5012))
    assert not torch.equal(calibration[1].argmax(-1), held_out[1].argmax(-1))
    fit = fit_closed_form(student, loaded.denoiser, calibration[0], calibration[2], calibration[1])
    check = evaluate_lambdas(student, loaded.denoiser, held_out[0], held_out[2], fit.lambdas, held_out[1])
    # Measured: held-out loss sum 0.81× the base solver's (calibration 0.79×); λ ≡ 0 gives exactly 1×.
    assert float(check.loss_fit.sum()) < 0.9 * float(check.loss_base.sum())


def test_ddpm_pipeline_folder_equals_the_diffusers_source():
    folder = fixture_path("diffusers", "tiny-ddpm")
    through_pipeline = load_denoiser("diffusers_pipeline", folder)
    direct = load_denoiser("diffusers", folder)
    assert through_pipeline.identity == direct.identity and through_pipeline.decoder is None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(through_pipeline.denoiser(x, 2.0), direct.denoiser(x, 2.0), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="unconditional DDPMPipeline"):
        load_denoiser("diffusers_pipeline", folder, guidance_scale=2.0)


def _config(tmp_path, folder, guidance_scale: float = GUIDANCE):
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {
            "denoiser": {"source": "diffusers_pipeline", "path": str(folder), "prompts": PROMPTS, "guidance_scale": guidance_scale},
            "solver": "ddim", "nfe": 4, "state_dtype": "float32", "output": str(tmp_path / "lambdas.safetensors"),
        },
        "data": {"scale": 3, "batch_size": 6, "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / f"sd-{guidance_scale}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_train_and_sample_end_to_end(tiny_sd, tmp_path, capsys):
    """train.py fits λ on the guided latent pipeline and records the guidance scale; sample.py decodes with the VAE,
    writes RGB images of the decoded size, and refuses the λ file at another guidance scale."""
    config = _config(tmp_path, tiny_sd)
    logger = json.dumps({"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb"), "name": "sd"}})
    assert train_main(["--config", str(config), "--trainer.logger", logger]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    grid = events.Images("samples/teacher")[0]  # the VAE decoded the 6 latents: 16×16 RGB, upscaled ×4 in the grid
    assert (grid.width, grid.height) == (6 * 64 + 5 * 4, 64)  # cells 4 px apart
    assert Image.open(io.BytesIO(grid.encoded_image_string)).mode == "RGB"  # not the 4-channel latents
    tensors, meta = load_lambdas(tmp_path / "lambdas.safetensors")
    assert meta["guidance_scale"] == GUIDANCE and isinstance(meta["guidance_scale"], float)
    assert meta["prompts"]["count"] == len(PROMPTS) and meta["class_conditional"] is True
    assert tensors["lambdas"].shape == (4,) and bool((tensors["lambdas"] != 0).all())

    outdir = tmp_path / "samples"
    argv = ["--config", str(config), "--lambdas", str(tmp_path / "lambdas.safetensors"), "--seeds", "0-2", "--outdir", str(outdir),
            "--format", "both", "--trainer.enable_progress_bar", "false"]
    assert sample_main(argv) == 0
    with np.load(next((outdir / "npz").glob("*.npz"))) as shard:
        assert shard["images"].shape == (3, 16, 16, 3) and shard["images"].dtype == np.uint8
        labels = shard["labels"].tolist()
    noise, onehot = seeded_noise([0, 1, 2], (4, 8, 8), len(PROMPTS))
    assert labels == onehot.argmax(-1).tolist()  # the prompt each seed drew
    assert len(list(outdir.glob("*/*.png"))) == 3 and (outdir / "grid.png").is_file()
    # The λ file exported as a DODEScheduler (issue 11 item 1) inside the real pipeline gives sample.py's images.
    from diffusers import StableDiffusionPipeline

    from dode_lightning import export_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = export_scheduler(tmp_path / "lambdas.safetensors", tiny_sd)
    assert pipe.scheduler.config.guidance_scale == GUIDANCE
    images = pipe([PROMPTS[i] for i in labels], negative_prompt=[""] * 3, guidance_scale=GUIDANCE, num_inference_steps=4,
                  latents=noise.float(), output_type="np").images
    with np.load(next((outdir / "npz").glob("*.npz"))) as shard:
        difference = np.abs(np.round(images * 255).astype(np.int64) - shard["images"].astype(np.int64))
    assert difference.max() <= 1  # measured: identical uint8 images; ±1 allows a rounding tie on another CPU

    capsys.readouterr()
    other = _config(tmp_path, tiny_sd, guidance_scale=2.0)
    argv = ["--config", str(other), "--lambdas", str(tmp_path / "lambdas.safetensors"), "--seeds", "0", "--outdir", str(tmp_path / "other")]
    assert sample_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "guidance_scale=5.0" in err[-1] and not (tmp_path / "other").exists()


def test_released_layout_variants(tiny_sd, tmp_path):
    """What hub folders hold: fp16 variant files only, a VAE with 2022 attention names in a .bin, and a CLIP text
    encoder that still stores its position_ids; loaded and cast to float32, the same denoiser and decoder."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "released"
    shutil.copytree(tiny_sd, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(unet)).items()}, str(unet.with_name("diffusion_pytorch_model.fp16.safetensors")))
    unet.unlink()
    encoder = folder / "text_encoder" / "model.safetensors"
    state = {k: v.half() for k, v in load_file(str(encoder)).items()}
    save_file({**state, "text_model.embeddings.position_ids": torch.arange(MAX_TOKENS)[None]}, str(encoder.with_name("model.fp16.safetensors")))
    encoder.unlink()
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in load_file(str(vae)).items():
        for new, old in legacy.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[name] = value
    assert any(".query." in name for name in renamed)
    torch.save(renamed, vae.with_suffix(".bin"))
    vae.unlink()

    original, released = _load(tiny_sd), _load(folder)
    assert all(p.dtype == torch.float32 for p in released.denoiser.parameters())
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(len(PROMPTS), dtype=torch.float64)[:3]
    with torch.no_grad():
        expected, found = original.denoiser(x, 2.0, labels), released.denoiser(x, 2.0, labels)
        torch.testing.assert_close(found, expected, rtol=0, atol=0.02 * float(expected.abs().max()))
        torch.testing.assert_close(released.decoder(x.float()), original.decoder(x.float()), rtol=0, atol=1e-5)
