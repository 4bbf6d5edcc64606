"""diffusers pipeline folders as denoisers: `DDPMPipeline`/`DDIMPipeline` (pixel space) and latent, text-conditional
`StableDiffusionPipeline` folders with classifier-free guidance (flow-matching SD3/FLUX folders: `flow_pipeline.py`).

For a Stable-Diffusion-style folder the denoiser is the UNet in latent space; the VAE is returned separately as a
decoder (images and FID only, never inside calibration). Conditioning is a list of prompts (or precomputed prompt
embeddings): a run draws one prompt index per seed exactly as class labels are drawn (`seeded_noise`), and the
one-hot label selects the prompt's embedding. Classifier-free guidance is part of the denoiser: the guided output
o_u + w·(o_c − o_u), computed as the pipeline computes it (one UNet call on the doubled batch [uncond, cond]),
is what the solver integrates; v-prediction outputs are turned into ε afterwards (linear, so the order does not
matter). Every component is built from its config and the weights are read by us (safetensors, or a `.bin`
through `torch.load(weights_only=True)`); nothing from the folder is executed and the hub is never contacted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..denoisers import DiscreteEpsDenoiser, eps_from_v
from ..schedules import VPDiscrete
from . import LoadedDenoiser
from .diffusers_folder import (
    DIFFUSERS_INSTALL_HINT,
    _folder_digest,
    _read_json,
    _read_weights,
    betas_from_scheduler_config,
    check_unet_config,
    convert_legacy_attention_names,
    load_diffusers_folder,
    read_embeds_file,
)
from .errors import CheckpointError, one_line, quoted, state_dict_mismatch
from .flow_pipeline import FLOW_PIPELINES, load_flow_pipeline

__all__ = [
    "SD_HUB_NAME",
    "PIXEL_PIPELINES",
    "TEXT_PIPELINES",
    "PromptBank",
    "GuidedEpsModel",
    "LatentDecoder",
    "load_pipeline_folder",
]

SD_HUB_NAME = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_DOWNLOAD_HINT = (
    f"download a StableDiffusionPipeline folder, e.g. `huggingface-cli download {SD_HUB_NAME} --local-dir DIR` "
    "(or a DDPMPipeline folder such as google/ddpm-cifar10-32)"
)
_TRANSFORMERS_HINT = "text-conditional pipelines need transformers: pip install 'dode-lightning[diffusers]'"
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
TEXT_PIPELINES = ("StableDiffusionPipeline",)
# diffusers/transformers weight file names, full precision first; fp16 variants are read and cast to float32.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
_REBUILT_BUFFERS = ("embeddings.position_ids",)
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Bounds on tokenizer/ before transformers reads it (CLIP's: tokenizer.json 2.2 MB, vocab.json 0.9 MB, 2 special
# tokens). transformers registers added tokens one by one: 200k of them took 205 s.
MAX_TOKENIZER_BYTES = 16 << 20
MAX_ADDED_TOKENS = 1000
_ADDED_TOKEN_KEYS = ("additional_special_tokens", "extra_special_tokens", "added_tokens_decoder", "added_tokens")


class PromptBank(nn.Module):
    """Prompt embeddings by prompt index: a precomputed table, or encoded with the pipeline's text encoder on first use.

    Encoded embeddings are kept for the `keep` most recently used prompts, so a long prompt list costs memory only
    for the prompts a batch draws (a solver asks for the same prompts at every evaluation).
    """

    def __init__(
        self,
        count: int,
        negative: Tensor,
        table: Tensor | None = None,
        encode: Callable[[list[str]], Tensor] | None = None,
        prompts: Sequence[str] = (),
        text_encoder: nn.Module | None = None,
        keep: int = 1024,
    ) -> None:
        super().__init__()
        self.count, self.keep = count, keep
        self.register_buffer("negative", negative, persistent=False)
        self.register_buffer("table", table, persistent=False)
        self.encode, self.prompts = encode, list(prompts)
        self.text_encoder = text_encoder  # registered so that it moves with the denoiser
        self.recent: OrderedDict[int, Tensor] = OrderedDict()

    def forward(self, indices: Tensor) -> Tensor:
        """(B, L, D) embeddings of the prompts `indices` (B,)."""
        if self.table is not None:
            return self.table[indices.to(self.table.device)]
        wanted = [int(i) for i in indices.tolist()]
        missing = sorted({i for i in wanted if i not in self.recent})
        if missing:
            with torch.no_grad():
                encoded = self.encode([self.prompts[i] for i in missing])
            for i, embedding in zip(missing, encoded):
                self.recent[i] = embedding
        for i in wanted:
            self.recent.move_to_end(i)
        while len(self.recent) > max(self.keep, len(set(wanted))):
            self.recent.popitem(last=False)
        return torch.stack([self.recent[i] for i in wanted])


class GuidedEpsModel(nn.Module):
    """ε(x_vp, t, prompt one-hot) of a text-conditional UNet with classifier-free guidance, as the pipeline computes it.

    w > 1: one UNet call on [x, x] with [negative, prompt] embeddings, output o_u + w·(o_c − o_u) (diffusers'
    `StableDiffusionPipeline.__call__`); w = 1: the conditional output alone (the pipeline skips the unconditional
    half there, and the formula gives the same). No labels: the unconditional (negative-prompt) output.
    `prediction_type` `v_prediction`: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t at the model's (possibly fractional) timestep.
    `unet_batch` caps the samples per UNet call (a guided call doubles them), so that a calibration batch of a
    large UNet fits in accelerator memory; None: the whole batch at once.
    """

    def __init__(
        self, unet: nn.Module, prompts: PromptBank, guidance_scale: float, prediction_type: str, schedule: VPDiscrete, unet_batch: int | None = None
    ) -> None:
        super().__init__()
        self.unet, self.prompts = unet, prompts
        self.guidance_scale, self.prediction_type, self.schedule = guidance_scale, prediction_type, schedule
        self.unet_batch = unet_batch

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        size = self.unet_batch or len(x)
        chunks = range(0, len(x), size)
        return torch.cat([self._guided(x[i : i + size], t[i : i + size], None if class_labels is None else class_labels[i : i + size]) for i in chunks])

    def _guided(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        x32, t32 = x.to(torch.float32), t.to(torch.float32)
        count = len(x)
        negative = self.prompts.negative.expand(count, *self.prompts.negative.shape[1:])
        if class_labels is None:
            output = self.unet(x32, t32, encoder_hidden_states=negative).sample
        else:
            cond = self.prompts(class_labels.argmax(-1)).to(x32.device)
            if self.guidance_scale == 1.0:
                output = self.unet(x32, t32, encoder_hidden_states=cond).sample
            else:
                both = self.unet(torch.cat([x32, x32]), torch.cat([t32, t32]), encoder_hidden_states=torch.cat([negative, cond])).sample
                uncond, text = both.chunk(2)
                output = uncond + self.guidance_scale * (text - uncond)
        if self.prediction_type == "v_prediction":
            sigma = self.schedule.sigma(t.to(torch.float64).cpu()).to(x.device)
            return eps_from_v(x32, sigma.to(torch.float32), output)
        return output


class LatentDecoder(nn.Module):
    """Latents → images in [−1, 1] with the pipeline's VAE (`vae.decode(latents / scaling_factor)`, float32)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.to(torch.float32) / self.scaling_factor + self.shift_factor).sample


def _weights_file(directory: Path, names: Sequence[str]) -> Path:
    found = next((directory / name for name in names if (directory / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{directory}: no weights ({' or '.join(names)}); {_DOWNLOAD_HINT}")
    return found


def _load_component(folder: Path, name: str, build: Callable[[dict[str, Any]], nn.Module], weight_names: Sequence[str], meta: bool = True) -> tuple[nn.Module, list[Path]]:
    """Build `folder/name` from its config.json (on the meta device when `meta`), load its weights strictly."""
    directory = folder / name
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {name}/config.json; {_DOWNLOAD_HINT}")
    weights_path = _weights_file(directory, weight_names)
    config = _read_json(config_path)
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            module = build(config)
    except Exception as err:  # diffusers/transformers reject a bad config with assorted exception types
        raise CheckpointError(f"{config_path}: cannot build the {name} ({type(err).__name__}: {one_line(err)})") from None
    expected = module.state_dict()
    # 2022-era diffusers attention names (released SD v1 VAEs) are renamed; buffers that older transformers saved
    # and current versions rebuild (CLIP's position_ids) are dropped when the module does not keep them.
    state_dict = convert_legacy_attention_names(_read_weights(weights_path))
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith(_REBUILT_BUFFERS)}
    mismatch = state_dict_mismatch(expected, state_dict)
    if mismatch:
        raise CheckpointError(f"{weights_path}: weights do not match {name}/config.json: {mismatch}")
    module.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in module.buffers()):
        raise CheckpointError(f"{config_path}: the {name} has buffers that are not in its weights file")
    return module.float().eval().requires_grad_(False), [config_path, weights_path]


def _read_prompts(prompts: Sequence[str] | str | os.PathLike) -> tuple[list[str], str]:
    """The prompt list and where it came from: a list in the config, or a text file with one prompt per line."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found: give a text file with one prompt per line, or a list of prompts")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"prompt file {path} is unreadable ({one_line(err)})") from None
        return [line for line in lines if line], f"file:{path}"
    if not all(isinstance(p, str) for p in prompts):
        raise CheckpointError("prompts must be a list of strings or the path of a text file with one prompt per line")
    return list(prompts), "list"


def _read_prompt_embeds(path: str | os.PathLike) -> tuple[Tensor, Tensor | None, str]:
    """(prompt_embeds (P, L, D), negative_prompt_embeds (1, L, D) or None, sha256) from a safetensors file."""
    file, tensors = read_embeds_file(path, "`prompt_embeds` (P, L, D) and optionally `negative_prompt_embeds` (1, L, D)")
    embeds, negative = tensors.get("prompt_embeds"), tensors.get("negative_prompt_embeds")
    if embeds is None or embeds.ndim != 3 or len(embeds) == 0:
        raise CheckpointError(f"{file}: expected a tensor `prompt_embeds` of shape (P, L, D) with P ≥ 1")
    if negative is not None and (negative.ndim != 3 or negative.shape[0] != 1 or negative.shape[1:] != embeds.shape[1:]):
        raise CheckpointError(f"{file}: `negative_prompt_embeds` must have shape (1, {embeds.shape[1]}, {embeds.shape[2]})")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return embeds.float(), None if negative is None else negative.float(), digest


def _text_encoder(folder: Path) -> tuple[Callable[[list[str]], Tensor], nn.Module, list[Path]]:
    """`encode(prompts) -> (N, L, D)` with the folder's tokenizer and CLIP text encoder, as `encode_prompt` does it."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise ImportError(_TRANSFORMERS_HINT) from None
    encoder, files = _load_component(folder, "text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)), _TRANSFORMERS_WEIGHTS, meta=False)
    tokenizer_dir = folder / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{folder}: missing tokenizer/ (or pass prompt_embeds); {_DOWNLOAD_HINT}")
    _check_tokenizer_files(tokenizer_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as err:  # transformers reports a broken tokenizer folder with assorted exception types
        raise CheckpointError(f"{tokenizer_dir}: unreadable tokenizer ({type(err).__name__}: {one_line(err)})") from None
    words, specials = len(tokenizer), len(set(tokenizer.all_special_ids))
    if words <= specials or words > encoder.config.vocab_size:
        # A folder without vocabulary files loads as a 2-token tokenizer: every prompt would encode alike.
        raise CheckpointError(
            f"{tokenizer_dir}: the tokenizer holds {words} token(s) ({specials} special), the text encoder expects up to "
            f"{encoder.config.vocab_size}; copy the pipeline's complete tokenizer/ folder"
        )
    max_length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
    files += sorted(tokenizer_dir / name for name in _TOKENIZER_FILES if (tokenizer_dir / name).is_file())

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        device = next(encoder.parameters()).device
        return encoder(ids.to(device))[0]

    return encode, encoder, files


def _check_tokenizer_files(directory: Path) -> None:
    """Refuse a tokenizer/ folder without vocabulary files, with a file over MAX_TOKENIZER_BYTES, or with more than
    MAX_ADDED_TOKENS added or special tokens, before transformers reads any of it."""
    present = [directory / name for name in _TOKENIZER_FILES if (directory / name).is_file()]
    names = {path.name for path in present}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(
            f"{directory}: no vocabulary (tokenizer.json, or vocab.json with merges.txt), so prompts cannot be encoded; "
            "copy the pipeline's complete tokenizer/ folder"
        )
    added = 0
    for path in present:
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB, not a CLIP tokenizer file")
        if path.suffix == ".json" and path.name != "vocab.json":
            data = _read_json(path, MAX_TOKENIZER_BYTES)
            entries = [data] if path.name == "added_tokens.json" else [data.get(key) for key in _ADDED_TOKEN_KEYS]
            added += sum(len(entry) for entry in entries if isinstance(entry, (list, dict)))
    if added > MAX_ADDED_TOKENS:
        raise CheckpointError(f"{directory}: {added} added or special tokens, more than {MAX_ADDED_TOKENS}; not a CLIP tokenizer")


def _guidance(guidance_scale: float | None) -> float:
    value = 7.5 if guidance_scale is None else guidance_scale  # diffusers' StableDiffusionPipeline default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1.0 <= value < float("inf"):
        raise CheckpointError(f"guidance_scale must be a finite number ≥ 1 (1 = no guidance), got {quoted(guidance_scale)}")
    return float(value)


def load_pipeline_folder(
    path: str | os.PathLike,
    prompts: Sequence[str] | str | None = None,
    prompt_embeds: str | os.PathLike | None = None,
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    integer_timesteps: bool = False,
    unet_batch: int | None = None,
    flow_options: dict[str, Any] | None = None,
) -> LoadedDenoiser:
    """A diffusers pipeline folder as a denoiser on the CPU (module doc); bad folders/options raise one-line errors.

    `flow_options` (`shift`, `mu`, `height`, `width`) apply to flow-matching pipelines only (`flow_pipeline.py`).
    """
    folder = Path(path)
    index_path = folder / "model_index.json"
    if not folder.is_dir() or not index_path.is_file():
        raise FileNotFoundError(f"diffusers pipeline folder not found: {folder} (no model_index.json); {_DOWNLOAD_HINT}")
    kind = _read_json(index_path).get("_class_name")
    flow_options = {k: v for k, v in (flow_options or {}).items() if v is not None}
    if unet_batch is not None and (not isinstance(unet_batch, int) or isinstance(unet_batch, bool) or unet_batch < 1):
        raise CheckpointError(f"unet_batch must be a positive integer (samples per UNet call) or null, got {quoted(unet_batch)}")
    if kind in FLOW_PIPELINES:
        if integer_timesteps:
            raise CheckpointError(f"{kind} is a flow-matching model with continuous time: remove integer_timesteps")
        if not isinstance(negative_prompt, str) or (negative_prompt and prompts is None):
            raise CheckpointError("negative_prompt is a string and needs prompts (with prompt_embeds, put the negative embeddings in the file)")
        return load_flow_pipeline(folder, kind, prompt_embeds, guidance_scale, prompts, negative_prompt, unet_batch, **flow_options)
    if flow_options:
        raise CheckpointError(f"{folder} is a {kind}, not a flow-matching pipeline: remove {', '.join(sorted(flow_options))} (flow options of SD3/FLUX folders)")
    if kind in PIXEL_PIPELINES:
        if prompts is not None or prompt_embeds is not None or guidance_scale is not None:
            raise CheckpointError(f"{folder} is an unconditional {kind}: remove prompts, prompt_embeds and guidance_scale")
        denoiser, schedule, image_shape, digest = load_diffusers_folder(folder, integer_timesteps=integer_timesteps)
        return LoadedDenoiser(denoiser, image_shape, 0, schedule, digest, "diffusers_pipeline")
    if kind not in TEXT_PIPELINES:
        raise CheckpointError(f"{index_path}: pipeline class {quoted(kind)} is not supported (supported: {', '.join(PIXEL_PIPELINES + TEXT_PIPELINES + FLOW_PIPELINES)})")
    if (prompts is None) == (prompt_embeds is None):
        raise CheckpointError(f"{kind} needs exactly one of prompts (a list or a text file, one per line) and prompt_embeds (a safetensors file)")
    scale = _guidance(guidance_scale)
    if not isinstance(negative_prompt, str):
        raise CheckpointError(f"negative_prompt must be a string, got {quoted(negative_prompt)}")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        raise ImportError(DIFFUSERS_INSTALL_HINT) from None

    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise FileNotFoundError(f"{folder}: missing scheduler/scheduler_config.json; {_DOWNLOAD_HINT}")
    scheduler_config = _read_json(scheduler_path)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{scheduler_path}: prediction_type {quoted(prediction)} is not supported (epsilon, v_prediction)")
    try:
        schedule = VPDiscrete(betas_from_scheduler_config(scheduler_config))
    except CheckpointError as err:
        raise CheckpointError(f"{scheduler_path}: {err}") from None
    unet_config_path = folder / "unet" / "config.json"
    if unet_config_path.is_file():  # sizes checked before anything is allocated (a missing file is reported below)
        unet_config = _read_json(unet_config_path)
        try:
            check_unet_config(unet_config)
        except CheckpointError as err:
            raise CheckpointError(f"{unet_config_path}: {err}") from None
        if any(unet_config.get(key) for key in ("time_cond_proj_dim", "class_embed_type", "addition_embed_type", "num_class_embeds")):
            raise CheckpointError(f"{unet_config_path}: UNets with guidance, class or added embeddings are not supported")
    unet, unet_files = _load_component(folder, "unet", UNet2DConditionModel.from_config, _DIFFUSERS_WEIGHTS)
    config = unet.config
    vae, _ = _load_component(folder, "vae", AutoencoderKL.from_config, _DIFFUSERS_WEIGHTS)

    files = [index_path, scheduler_path, *unet_files]
    text_encoder = None
    if prompt_embeds is not None:
        if negative_prompt:
            raise CheckpointError("negative_prompt needs the text encoder: with prompt_embeds, put `negative_prompt_embeds` in the file")
        table, negative, digest = _read_prompt_embeds(prompt_embeds)
        source, count, encode, prompt_list = f"embeds:{Path(prompt_embeds).name}", len(table), None, []
        if negative is None:
            if scale != 1.0:
                raise CheckpointError(f"{prompt_embeds}: guidance_scale {scale} needs `negative_prompt_embeds` in the file")
            negative = torch.zeros_like(table[:1])  # unused: w = 1 and every seed has a prompt
        prompt_identity = {"source": source, "count": count, "sha256": digest}
    else:
        prompt_list, source = _read_prompts(prompts)
        if not prompt_list:
            raise CheckpointError(f"the prompt list ({source}) is empty")
        encode, text_encoder, encoder_files = _text_encoder(folder)
        files += encoder_files
        with torch.no_grad():
            negative = encode([negative_prompt])
        table, count = None, len(prompt_list)
        digest = hashlib.sha256(json.dumps({"prompts": prompt_list, "negative_prompt": negative_prompt}).encode()).hexdigest()
        prompt_identity = {"source": source, "count": count, "sha256": digest, "negative_prompt": negative_prompt}
    if table is not None and table.shape[-1] != config.cross_attention_dim:
        raise CheckpointError(f"{prompt_embeds}: embeddings of width {table.shape[-1]}, the UNet expects {config.cross_attention_dim}")
    bank = PromptBank(count, negative.detach(), table, encode, prompt_list, text_encoder)
    eps_model = GuidedEpsModel(unet, bank, scale, prediction, schedule, unet_batch)
    denoiser = DiscreteEpsDenoiser(eps_model, schedule, integer_timesteps=integer_timesteps, conditional=True)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return LoadedDenoiser(
        denoiser.eval().requires_grad_(False),
        (int(config.in_channels), int(height), int(width)),
        count,
        schedule,
        _folder_digest(files, folder),
        "diffusers_pipeline",
        LatentDecoder(vae).eval(),
        (int(vae.config.out_channels), int(height) * factor, int(width) * factor),
        {"guidance_scale": scale, "prompts": prompt_identity, "prediction_type": prediction},
    )
