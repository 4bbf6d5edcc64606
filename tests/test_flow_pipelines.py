"""SD3 and FLUX pipeline folders as flow denoisers: tiny random-weight pipelines against diffusers' own loop."""
import pytest
import torch

from dode_lightning.checkpoints import CheckpointError, load_denoiser
from dode_lightning.checkpoints.flow_pipeline import pack_latents, unpack_latents
from dode_lightning.grids import make_sigmas
from dode_lightning.schedules import FlowMatching
from tests.pipelines import write_flow_prompt_embeds, write_tiny_flux_pipeline, write_tiny_sd3_pipeline, write_tiny_sd_pipeline

NO_TEXT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {
        "sd3": write_tiny_sd3_pipeline(root / "tiny-sd3"),
        "flux": write_tiny_flux_pipeline(root / "tiny-flux"),
        "embeds": write_flow_prompt_embeds(root / "embeds.safetensors"),
        "root": root,
    }


def load(folders, kind, **options):
    options = {"height": 16, "width": 16, **options}
    return load_denoiser("diffusers_pipeline", path=folders[kind], prompt_embeds=str(folders["embeds"]), **options)


def flow_euler(loaded, noise, labels, steps):
    """Euler in flow time on the loaded denoiser's own grid: x ← x + (t' − t)·v, v = ε̂ − x̂₀ (from t = 1)."""
    times = loaded.schedule.sigma_inv(make_sigmas(loaded.schedule.own_grid, steps, loaded.schedule))
    x = noise.to(torch.float64)
    for t, t_next in zip(times[:-1], times[1:]):
        eps, denoised = loaded.denoiser.flow_eps_and_denoised(x, t, labels)
        x = x + (t_next - t) * (eps - denoised)
    return x


def pipeline_latents(folders, kind, noise, prompt, steps, **call):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    embeds = load_file(str(folders["embeds"]))
    conditioning = dict(prompt_embeds=embeds["prompt_embeds"][prompt : prompt + 1], pooled_prompt_embeds=embeds["pooled_prompt_embeds"][prompt : prompt + 1])
    common = dict(height=16, width=16, num_inference_steps=steps, output_type="latent", **conditioning, **call)
    if kind == "flux":
        pipe = FluxPipeline.from_pretrained(folders[kind], **NO_TEXT)
        return unpack_latents(pipe(latents=pack_latents(noise), **common).images, *noise.shape[-2:])
    pipe = StableDiffusion3Pipeline.from_pretrained(folders[kind], text_encoder_3=None, tokenizer_3=None, **NO_TEXT)
    negative = dict(negative_prompt_embeds=embeds["negative_prompt_embeds"], negative_pooled_prompt_embeds=embeds["negative_pooled_prompt_embeds"])
    return pipe(latents=noise, **common, **negative).images


@pytest.mark.parametrize("kind, guidance", [("sd3", 7.0), ("sd3", 1.0), ("flux", 3.5), ("flux", 2.0)])
def test_loaded_pipeline_reproduces_the_pipelines_euler(folders, kind, guidance):
    loaded = load(folders, kind, guidance_scale=guidance)
    assert loaded.image_shape == (4, 8, 8) and loaded.output_shape == (3, 16, 16) and loaded.label_dim == 3
    assert isinstance(loaded.schedule, FlowMatching)
    assert loaded.conditioning["time_shift"] == ({"shift": 3.0} if kind == "sd3" else {"mu": pytest.approx(0.459375), "time_shift_type": "exponential"})
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.nn.functional.one_hot(torch.tensor([1]), 3).double()
    ours = flow_euler(loaded, noise, labels, 4)
    reference = pipeline_latents(folders, kind, noise, 1, 4, guidance_scale=guidance).double()
    assert ((ours - reference).norm() / reference.norm()) < 1e-5


def test_flow_options_are_refused_where_they_do_not_apply(folders):
    with pytest.raises(CheckpointError, match="give mu, not shift"):
        load(folders, "flux", shift=2.0)
    with pytest.raises(CheckpointError, match="not mu"):
        load(folders, "sd3", mu=0.7)
    with pytest.raises(CheckpointError, match=r"\(0, 100\]"):
        load(folders, "sd3", shift=0.0)
    assert load(folders, "sd3", shift=2.5).schedule.shift == 2.5
    sd = write_tiny_sd_pipeline(folders["root"] / "tiny-sd")
    with pytest.raises(CheckpointError, match="not a flow-matching pipeline: remove shift"):
        load_denoiser("diffusers_pipeline", path=sd, prompts=["a"], shift=3.0)
    with pytest.raises(CheckpointError, match="needs exactly one of prompt_embeds"):
        load_denoiser("diffusers_pipeline", path=folders["sd3"])
    no_negative = write_flow_prompt_embeds(folders["root"] / "positive.safetensors", negative=False)
    with pytest.raises(CheckpointError, match="negative_prompt_embeds"):
        load_denoiser("diffusers_pipeline", path=folders["sd3"], prompt_embeds=str(no_negative))
    assert load_denoiser("diffusers_pipeline", path=folders["sd3"], prompt_embeds=str(no_negative), guidance_scale=1.0).label_dim == 3


def test_sd3_prompts_through_its_clip_encoders_without_t5(tmp_path):
    """SD3 with prompts (no T5, optional as in diffusers): the loaded denoiser equals the pipeline called with text."""
    from diffusers import StableDiffusion3Pipeline

    folder = write_tiny_sd3_pipeline(tmp_path / "tiny-sd3-text", text_encoders=True)
    loaded = load_denoiser("diffusers_pipeline", path=folder, prompts=["a red fox", "a blue sky"], negative_prompt="blur", height=16, width=16)
    assert loaded.label_dim == 2 and loaded.conditioning["prompts"]["negative_prompt"] == "blur"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = pipe(prompt="a blue sky", negative_prompt="blur", height=16, width=16, num_inference_steps=4, output_type="latent", latents=noise).images
    ours = flow_euler(loaded, noise, torch.tensor([[0.0, 1.0]], dtype=torch.float64), 4)
    assert float((ours - reference.double()).norm() / reference.norm()) < 1e-5
    with pytest.raises(CheckpointError, match="exactly one of prompt_embeds"):
        load_denoiser("diffusers_pipeline", path=folder, height=16, width=16)
    with pytest.raises(CheckpointError, match="prompts work with SD3 folders"):
        load_denoiser("diffusers_pipeline", path=write_tiny_flux_pipeline(tmp_path / "tiny-flux"), prompts=["a"], height=16, width=16)
