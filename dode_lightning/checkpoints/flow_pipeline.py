"""Flow-matching pipeline folders as denoisers: `StableDiffusion3Pipeline` (SD3Transformer2DModel, true classifier-free
guidance on [uncond, cond]) and `FluxPipeline` (FluxTransformer2DModel; a guidance-embedded model takes the
guidance scale as an input, no doubled batch; latents packed 2×2 into a token sequence with image/text position ids).

The denoiser is a `VelocityDenoiser` around the guided transformer, on the pipeline's latents x_t (unpacked,
(C, H, W), so a seed's noise is the pipeline's own `randn` before packing). The schedule is `FlowMatching` with the
folder's time shift: SD3's static `shift`, or FLUX's dynamic shift with μ from the image token count, as the
pipelines compute it; its default grid is the one the pipeline asks its scheduler for (`flow`: SD3, `flux`:
FluxPipeline's linspace(1, 1/N, N)). Conditioning is one prompt per class label as for Stable Diffusion: a file of
precomputed text embeddings, or (SD3) a prompt list encoded once by the folder's two CLIP encoders and, where the
folder has one, its T5 encoder (optional in SD3, as in diffusers), through the pipeline's own `encode_prompt`.
Every component is built from its config and its weights are read by `_load_component` (safetensors or a
weights-only `.bin`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import VelocityDenoiser
from ..schedules import FlowMatching, dynamic_shift_mu
from . import LoadedDenoiser
from .diffusers_folder import DIFFUSERS_INSTALL_HINT, _folder_digest, _read_json, read_embeds_file
from .errors import CheckpointError, quoted

__all__ = ["FLOW_PIPELINES", "FLOW_OPTIONS", "GuidedVelocityModel", "flow_schedule", "load_flow_pipeline"]

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
FLOW_OPTIONS = ("shift", "mu", "height", "width")
_DEFAULT_GUIDANCE = {"StableDiffusion3Pipeline": 7.0, "FluxPipeline": 3.5}  # the pipelines' defaults
_EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


def flow_schedule(config: dict[str, Any], image_seq_len: int, shift: float | None = None, mu: float | None = None, grid: str = "flow") -> FlowMatching:
    """The `FlowMatching` schedule of a FlowMatchEulerDiscreteScheduler config at an image of `image_seq_len` tokens.

    Static shift: `shift` (default the config's); dynamic (`use_dynamic_shifting`): μ as the pipelines compute it from
    base/max shift and image sequence lengths, unless given. Options the config cannot honour are refused.
    """
    if config.get("_class_name") not in (None, "FlowMatchEulerDiscreteScheduler"):
        raise CheckpointError(f"scheduler {quoted(config.get('_class_name'))} is not a FlowMatchEulerDiscreteScheduler")
    unsupported = [key for key in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling") if config.get(key)]
    if unsupported:
        raise CheckpointError(f"scheduler options {', '.join(unsupported)} are not supported (the flow grid is diffusers' default shifted grid)")
    train = int(config.get("num_train_timesteps", 1000))
    if config.get("use_dynamic_shifting"):
        if shift is not None:
            raise CheckpointError("this pipeline shifts its time grid dynamically (by image size): give mu, not shift")
        if mu is None:
            keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
            defaults = (256, 4096, 0.5, 1.15)
            mu = dynamic_shift_mu(image_seq_len, *(config.get(k, d) if config.get(k) is not None else d for k, d in zip(keys, defaults)))
        return FlowMatching(mu=mu, time_shift_type=config.get("time_shift_type", "exponential"), num_train_timesteps=train, own_grid=grid)
    if mu is not None:
        raise CheckpointError("this pipeline uses a static time shift: give shift, not mu")
    return FlowMatching(config.get("shift", 1.0) if shift is None else shift, num_train_timesteps=train, own_grid=grid)


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): FLUX's 2×2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for latents of height × width."""
    b, _, channels = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int) -> Tensor:
    """FLUX's image position ids of the packed latents: (H/2·W/2, 3) rows [0, row, column]."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


class GuidedVelocityModel(nn.Module):
    """v(x_t, t, prompt one-hot) of an SD3 or FLUX transformer with the pipeline's guidance.

    SD3 (`embedded_guidance` False): w > 1 runs the transformer once on [x, x] with [negative, prompt] embeddings and
    returns v_u + w·(v_c − v_u) (StableDiffusion3Pipeline); w = 1 the conditional velocity. Timestep input t·1000.
    FLUX: latents are packed 2×2, the transformer gets t, the image/text position ids and, for a guidance-embedded
    model, the guidance scale as an input; the output is unpacked. `batch` caps samples per transformer call.
    """

    def __init__(self, transformer: nn.Module, embeds: dict[str, Tensor], guidance_scale: float, flux: bool, batch: int | None = None) -> None:
        super().__init__()
        self.transformer, self.guidance_scale, self.flux, self.batch = transformer, guidance_scale, flux, batch
        for key, value in embeds.items():
            self.register_buffer(key, value, persistent=False)
        self.embedded_guidance = flux and bool(transformer.config.get("guidance_embeds", False))

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            raise ValueError("this text-conditional flow model needs prompt labels (one-hot rows over the prompts)")
        size = self.batch or len(x_t)
        return torch.cat([self._velocity(x_t[i : i + size], t[i : i + size], class_labels[i : i + size]) for i in range(0, len(x_t), size)])

    def _velocity(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        x32, t32 = x.to(torch.float32), t.to(torch.float32)
        index = class_labels.argmax(-1).to(self.prompt_embeds.device)
        cond, pooled = self.prompt_embeds[index], self.pooled_prompt_embeds[index]
        if self.flux:
            return self._flux(x32, t32, cond, pooled)
        if self.guidance_scale == 1.0:
            return self._sd3(x32, t32, cond, pooled)
        count = len(x)
        negative = self.negative_prompt_embeds.expand(count, -1, -1)
        negative_pooled = self.negative_pooled_prompt_embeds.expand(count, -1)
        both = self._sd3(torch.cat([x32, x32]), torch.cat([t32, t32]), torch.cat([negative, cond]), torch.cat([negative_pooled, pooled]))
        uncond, text = both.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def _sd3(self, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        timestep = t * 1000  # the pipeline passes the scheduler's timesteps, σ_flow·num_train_timesteps
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]

    def _flux(self, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        guidance = torch.full((len(x),), self.guidance_scale, dtype=torch.float32, device=x.device) if self.embedded_guidance else None
        timestep = (t * 1000) / 1000  # as FluxPipeline: the scheduler's timestep (t·1000, float32) / 1000
        tokens = self.transformer(
            hidden_states=pack_latents(x), timestep=timestep, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device),
            img_ids=image_ids(height, width).to(x.device), return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)


def _read_flow_embeds(path: str | os.PathLike, needs_negative: bool, width: int, pooled_width: int) -> tuple[dict[str, Tensor], str]:
    file, tensors = read_embeds_file(path, ", ".join(_EMBED_KEYS))
    embeds, pooled = tensors.get("prompt_embeds"), tensors.get("pooled_prompt_embeds")
    if embeds is None or embeds.ndim != 3 or len(embeds) == 0 or embeds.shape[-1] != width:
        raise CheckpointError(f"{file}: expected `prompt_embeds` of shape (P, L, {width}) with P ≥ 1")
    if pooled is None or pooled.shape != (len(embeds), pooled_width):
        raise CheckpointError(f"{file}: expected `pooled_prompt_embeds` of shape ({len(embeds)}, {pooled_width})")
    out = {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}
    if needs_negative:
        negative, negative_pooled = tensors.get("negative_prompt_embeds"), tensors.get("negative_pooled_prompt_embeds")
        if negative is None or negative.shape != (1, *embeds.shape[1:]) or negative_pooled is None or negative_pooled.shape != (1, pooled_width):
            raise CheckpointError(f"{file}: guidance needs `negative_prompt_embeds` (1, {embeds.shape[1]}, {width}) and `negative_pooled_prompt_embeds` (1, {pooled_width})")
        out.update(negative_prompt_embeds=negative.float(), negative_pooled_prompt_embeds=negative_pooled.float())
    return out, hashlib.sha256(file.read_bytes()).hexdigest()


def _encode_sd3_prompts(
    folder: Path, transformer: nn.Module, vae: nn.Module, scheduler_config: dict[str, Any], prompts: list[str], negative_prompt: str
) -> tuple[dict[str, Tensor], list[Path]]:
    """The SD3 prompt table from the folder's text encoders, by `StableDiffusion3Pipeline.encode_prompt` on components
    built and loaded here (CLIP-L/G; T5 when the folder has `text_encoder_3/`, else zeros as diffusers uses), and
    the encoder files read."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from .diffusers_pipeline import _TRANSFORMERS_WEIGHTS, _load_component

    def tokenizer(name: str, cls: type) -> Any:
        try:
            return cls.from_pretrained(str(folder / name), local_files_only=True)
        except Exception as err:  # transformers reports a broken tokenizer folder with assorted exception types
            raise CheckpointError(f"{folder / name}: unreadable tokenizer ({type(err).__name__}: {str(err)[:120]}); or pass prompt_embeds") from None

    components: dict[str, Any] = {"text_encoder_3": None, "tokenizer_3": None}
    files: list[Path] = []
    encoders = [("", CLIPTextModelWithProjection, CLIPTextConfig, CLIPTokenizer), ("_2", CLIPTextModelWithProjection, CLIPTextConfig, CLIPTokenizer)]
    if (folder / "text_encoder_3" / "config.json").is_file():
        encoders.append(("_3", T5EncoderModel, T5Config, T5TokenizerFast))
    for suffix, model, model_config, tokenizer_class in encoders:
        build = lambda c, model=model, model_config=model_config: model(model_config.from_dict(c))  # noqa: E731
        components[f"text_encoder{suffix}"], encoder_files = _load_component(folder, f"text_encoder{suffix}", build, _TRANSFORMERS_WEIGHTS, meta=False)
        components[f"tokenizer{suffix}"] = tokenizer(f"tokenizer{suffix}", tokenizer_class)
        files += encoder_files
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), **components)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"), do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
        )
    table = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative[:1], "negative_pooled_prompt_embeds": negative_pooled[:1]}
    return table, files


def _pixels(value: Any, name: str, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
        raise CheckpointError(f"{name} must be a positive multiple of {multiple} pixels, got {quoted(value)}")
    return value


def load_flow_pipeline(
    folder: Path,
    kind: str,
    prompt_embeds: str | os.PathLike | None,
    guidance_scale: float | None,
    prompts: list[str] | str | None,
    negative_prompt: str,
    batch: int | None,
    shift: float | None = None,
    mu: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> LoadedDenoiser:
    """An SD3 or FLUX pipeline folder as a flow denoiser on the CPU (module doc); bad folders/options: one line."""
    from .diffusers_pipeline import _DIFFUSERS_WEIGHTS, LatentDecoder, _guidance, _load_component

    if (prompt_embeds is None) == (prompts is None):
        raise CheckpointError(f"{kind} needs exactly one of prompt_embeds (a safetensors file with {', '.join(_EMBED_KEYS)}) and prompts (SD3 only)")
    if prompts is not None and kind != "StableDiffusion3Pipeline":
        raise CheckpointError(f"{kind} takes prompt_embeds (its prompt encoding needs T5, which is not loaded here); prompts work with SD3 folders")
    try:
        from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    except ImportError:
        raise ImportError(DIFFUSERS_INSTALL_HINT) from None
    flux = kind == "FluxPipeline"
    scale = _guidance(_DEFAULT_GUIDANCE[kind] if guidance_scale is None else guidance_scale)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise FileNotFoundError(f"{folder}: missing scheduler/scheduler_config.json")
    scheduler_config = _read_json(scheduler_path)
    build = FluxTransformer2DModel.from_config if flux else SD3Transformer2DModel.from_config
    transformer, transformer_files = _load_component(folder, "transformer", build, _DIFFUSERS_WEIGHTS)
    vae, _ = _load_component(folder, "vae", AutoencoderKL.from_config, _DIFFUSERS_WEIGHTS)
    config = transformer.config
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if flux:  # FluxPipeline: default 128·factor pixels; latents 2·⌊size/(2·factor)⌋, packed 2×2
        default = 128 * factor
        height, width = (_pixels(v if v is not None else default, n, 2 * factor) for v, n in ((height, "height"), (width, "width")))
        channels, latent_h, latent_w = int(config.in_channels) // 4, height // factor, width // factor
        tokens = (latent_h // 2) * (latent_w // 2)
    else:
        default = int(config.sample_size) * factor
        patch = int(config.patch_size)
        height, width = (_pixels(v if v is not None else default, n, patch * factor) for v, n in ((height, "height"), (width, "width")))
        channels, latent_h, latent_w = int(config.in_channels), height // factor, width // factor
        tokens = (latent_h // patch) * (latent_w // patch)
    try:
        schedule = flow_schedule(scheduler_config, tokens, shift, mu, "flux" if flux else "flow")
    except ValueError as err:
        raise CheckpointError(f"{scheduler_path}: {err}") from None
    embedded = flux and bool(config.get("guidance_embeds", False))
    if flux and not embedded and scale != 1.0:
        raise CheckpointError(f"{folder}: this FLUX transformer has no guidance embedding; use guidance_scale 1 (FLUX-schnell style)")
    if prompts is not None:
        from .diffusers_pipeline import _read_prompts

        prompt_list, source = _read_prompts(prompts)
        if not prompt_list:
            raise CheckpointError(f"the prompt list ({source}) is empty")
        embeds, encoder_files = _encode_sd3_prompts(folder, transformer, vae, scheduler_config, prompt_list, negative_prompt)
        digest = hashlib.sha256(json.dumps({"prompts": prompt_list, "negative_prompt": negative_prompt}).encode()).hexdigest()
        prompt_identity = {"source": source, "count": len(prompt_list), "sha256": digest, "negative_prompt": negative_prompt}
    else:
        encoder_files = []
        embeds, digest = _read_flow_embeds(prompt_embeds, not flux and scale != 1.0, int(config.joint_attention_dim), int(config.pooled_projection_dim))
        prompt_identity = {"source": f"embeds:{Path(prompt_embeds).name}", "count": len(embeds["prompt_embeds"]), "sha256": digest}
    model = GuidedVelocityModel(transformer, embeds, scale, flux, batch)
    files = [folder / "model_index.json", scheduler_path, *transformer_files, *encoder_files]
    return LoadedDenoiser(
        VelocityDenoiser(model).eval().requires_grad_(False),
        (channels, latent_h, latent_w),
        len(embeds["prompt_embeds"]),
        schedule,
        _folder_digest(files, folder),
        "diffusers_pipeline",
        LatentDecoder(vae).eval(),
        (int(vae.config.out_channels), height, width),
        {
            "guidance_scale": scale,
            "prompts": prompt_identity,
            "prediction_type": "flow",
            "time_shift": schedule.time_shift,
        },
    )
