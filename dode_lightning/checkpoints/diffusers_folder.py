"""diffusers DDPM folders (google/ddpm-cifar10-32 layout) as ε-models on the discrete VP schedule.

A `DDPMPipeline` folder holds `unet/config.json` + weights and `scheduler/scheduler_config.json` (checkpoints.md
§10). The UNet is built by diffusers' `UNet2DModel.from_config`; the weights are read by us — safetensors, or the
2022-era `diffusion_pytorch_model.bin` through `torch.load(weights_only=True)` with the old attention names
(`query/key/value/proj_attn`) renamed to the current ones — and loaded with `strict=True`. The β table is rebuilt
as diffusers does (float32 values), and the model is wrapped with `DiscreteEpsDenoiser` into the VE-form denoiser
interface. diffusers is an optional dependency, imported only here.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoisers import Denoiser, DiscreteEpsDenoiser
from ..schedules import VPDiscrete, cosine_betas
from .errors import CheckpointError, one_line, quoted, state_dict_mismatch

__all__ = [
    "DIFFUSERS_INSTALL_HINT",
    "DiffusersEpsModel",
    "DiffusersDDIMClip",
    "betas_from_scheduler_config",
    "check_unet_config",
    "convert_legacy_attention_names",
    "load_diffusers_folder",
]

DIFFUSERS_INSTALL_HINT = (
    "loading a diffusers folder needs the optional dependency diffusers: "
    "pip install 'dode-lightning[diffusers]' (or pip install diffusers)"
)
_RELEASE_HINT = "e.g. google/ddpm-cifar10-32 from the Hugging Face hub (https://huggingface.co/google/ddpm-cifar10-32)"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
MAX_CONFIG_BYTES = 1 << 20
"""A diffusers config is a few kB; anything over 1 MiB is refused unread."""
MAX_TRAIN_TIMESTEPS = 100_000
"""Released DDPMs are trained with 1000 steps (some with 4000); the β table is allocated from this number."""
MAX_SAMPLE_SIZE = 4096
MAX_CHANNELS = 64
MAX_LAYERS_PER_BLOCK = 64
MAX_BLOCKS = 16
_DEFAULT_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")  # UNet2DModel's


class DiffusersEpsModel(nn.Module):
    """ε(x_vp, t) from a diffusers UNet2DModel: float32 compute, (possibly fractional) timesteps t."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x.to(torch.float32), t.to(torch.float32)).sample


class DiffusersDDIMClip(nn.Module):
    """Makes our DDIM on `sigmas` reproduce diffusers' `DDIMScheduler` with `clip_sample=True` (η = 0).

    diffusers clips x̂₀ to ±clip_range but keeps the raw ε in the direction term (`use_clipped_model_output=False`):
    x̄_{k+1} = clip(D) + σ_{k+1}·ε. DDIM derives ε from the one D it is given, so no single clipped D reproduces
    that; the step is matched by returning D′ = D + σ_k/(σ_k − σ_{k+1})·(clip(D) − D), which needs the next
    noise level. Hence this wrapper is tied to one grid and accepts only scalar σ on it (σ_{k+1} is looked up).
    It changes nothing in the solver's stage mechanism; D′ is only meaningful for DDIM on this grid.
    """

    def __init__(self, denoiser: Denoiser, sigmas: Tensor, clip_range: float = 1.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        self.clip_range = clip_range

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        sigma_k = torch.as_tensor(sigma, dtype=torch.float64)
        hits = (self.sigmas[:-1] - sigma_k.cpu()).abs().le(1e-9 * self.sigmas[0]).nonzero() if sigma_k.numel() == 1 else []
        if len(hits) == 0:
            raise ValueError(f"DiffusersDDIMClip is tied to its grid; σ={sigma} is not one of its step starts")
        sigma_k, sigma_next = float(sigma_k), float(self.sigmas[int(hits[0]) + 1])
        denoised = self.denoiser(x, sigma, class_labels)
        clipped = denoised.clamp(-self.clip_range, self.clip_range)
        return denoised + sigma_k / (sigma_k - sigma_next) * (clipped - denoised)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounded_int(config: dict[str, Any], key: str, default: Any, low: int, high: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CheckpointError(f"{key} is {quoted(value)}; expected an integer from {low} to {high}")
    return value


def _beta(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if not _is_number(value) or not 0 < value < 1:
        raise CheckpointError(f"{key} is {quoted(value)}; expected a number strictly between 0 and 1")
    return float(value)


def betas_from_scheduler_config(config: dict[str, Any]) -> Tensor:
    """β_0…β_{T−1} (float64 holding diffusers' float32 values) from a DDPM/DDIM scheduler config.

    Every value is checked before the table is allocated, and the table itself must lie in (0, 1): β = 1 makes
    ᾱ = 0 (σ = ∞, black images), β ≤ 0 or NaN make σ non-increasing or undefined.
    """
    if config.get("rescale_betas_zero_snr"):
        raise CheckpointError("scheduler uses rescale_betas_zero_snr, which is not supported")
    schedule = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or not 2 <= len(trained) <= MAX_TRAIN_TIMESTEPS or not all(map(_is_number, trained)):
            raise CheckpointError(f"trained_betas is not a list of 2 to {MAX_TRAIN_TIMESTEPS} numbers")
        betas = torch.tensor(trained, dtype=torch.float32)
    else:
        steps = _bounded_int(config, "num_train_timesteps", 1000, 2, MAX_TRAIN_TIMESTEPS)
        start, end = _beta(config, "beta_start", 1e-4), _beta(config, "beta_end", 0.02)
        if schedule == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = cosine_betas(steps).to(torch.float32)
        else:
            raise CheckpointError(f"unsupported beta_schedule {quoted(schedule)} (linear, scaled_linear, squaredcos_cap_v2)")
    outside = ((betas <= 0) | (betas >= 1) | betas.isnan()).nonzero()
    if len(outside):
        first = int(outside[0])
        raise CheckpointError(f"{len(outside)} β value(s) outside (0, 1) (first β_{first} = {float(betas[first]):.6g}); the noise schedule would be degenerate")
    return betas.to(torch.float64)


def check_unet_config(config: dict[str, Any]) -> tuple[int, int, int]:
    """The (C, H, W) of one sample from a UNet2DModel config, after checking the fields that size the network and
    its samples, so a bad value ends here and not in an allocation or a shape error mid-run."""
    channels = _bounded_int(config, "in_channels", 3, 1, MAX_CHANNELS)
    if _bounded_int(config, "out_channels", 3, 1, MAX_CHANNELS) != channels:
        raise CheckpointError("in_channels != out_channels, not an ε-model of the image")
    _bounded_int(config, "layers_per_block", 2, 1, MAX_LAYERS_PER_BLOCK)
    down_blocks = config.get("down_block_types", _DEFAULT_DOWN_BLOCKS)
    if not isinstance(down_blocks, (list, tuple)) or not 1 <= len(down_blocks) <= MAX_BLOCKS:
        raise CheckpointError(f"down_block_types is {quoted(down_blocks)}; expected a list of 1 to {MAX_BLOCKS} block names")
    size = config.get("sample_size")
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    reduction = 2 ** (len(down_blocks) - 1)  # every down block but the last halves the resolution
    for side in sides:
        if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SAMPLE_SIZE or side % reduction:
            shown = f"[{', '.join(map(quoted, sides))}]" if len(sides) == 2 else quoted(size)
            raise CheckpointError(
                f"sample_size is {shown}; expected an integer (or two) from 1 to {MAX_SAMPLE_SIZE} divisible by "
                f"{reduction}, the UNet's downsampling factor"
            )
    height, width = sides * 2 if len(sides) == 1 else sides
    return channels, height, width


def convert_legacy_attention_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename 2022-era attention parameters (…attentions.N.query.weight → …attentions.N.to_q.weight, etc.)."""
    converted = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
        converted[name] = value
    return converted


def _read_json(path: Path, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object from a file of at most `limit` bytes; anything else (too large or deep, an integer Python refuses
    to parse, not an object) is a one-line CheckpointError."""
    try:
        with open(path, "rb") as handle:  # at most one byte past the limit, whatever size the file claims
            raw = handle.read(limit + 1)
        if len(raw) > limit:
            raise CheckpointError(f"{path}: larger than {limit / (1 << 20):g} MiB, not a diffusers config")
        data = json.loads(raw.decode())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, huge ints
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable JSON ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _check_stored_zip(path: Path) -> None:
    """torch.save (torch ≥ 1.6) writes an uncompressed zip. A compressed member, which torch.load would inflate
    whole in memory before checking its size (a zip bomb), and a pre-zip legacy file, whose storages torch allocates
    at the size they claim, are refused before torch.load sees them."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path}: not a zip-format torch.save file; convert the weights to safetensors or re-save them with torch ≥ 1.6") from None
    if packed:
        raise CheckpointError(f"{path}: {len(packed)} compressed member(s) (first {quoted(packed[0])}); torch.save stores weights uncompressed")


def read_embeds_file(path: str | os.PathLike, contents: str) -> tuple[Path, dict[str, Tensor]]:
    """(path, tensors) of a precomputed prompt-embeddings file: a safetensors file (never a pickle) holding `contents`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompt_embeds file {file} not found: a safetensors file with {contents}")
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: prompt_embeds must be a .safetensors file (no pickles)")
    return file, _read_weights(file)


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        _check_stored_zip(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # malformed weights of either format end here as one clean error
        raise CheckpointError(f"{path}: unreadable weights ({type(err).__name__}: {one_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return dict(state)


def _folder_digest(files: list[Path], root: Path) -> str:
    """sha256 over (relative path, sha256 of contents) of each file, in the given order."""
    outer = hashlib.sha256()
    for file in files:
        inner = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{file.relative_to(root).as_posix()}\t{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def _locate(folder: Path) -> tuple[Path, Path, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"diffusers DDPM folder not found: {folder}. Expected a DDPMPipeline folder (scheduler/scheduler_config.json, "
            f"unet/config.json, unet/diffusion_pytorch_model.safetensors or .bin), {_RELEASE_HINT}"
        )
    scheduler_config, unet_config = folder / "scheduler" / "scheduler_config.json", folder / "unet" / "config.json"
    for required in (scheduler_config, unet_config):
        if not required.is_file():
            raise FileNotFoundError(f"{folder}: missing {required.relative_to(folder)}; expected the DDPMPipeline layout, {_RELEASE_HINT}")
    weights = next((folder / "unet" / name for name in _WEIGHT_FILES if (folder / "unet" / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: missing unet/{_WEIGHT_FILES[0]} (or unet/{_WEIGHT_FILES[1]}), {_RELEASE_HINT}")
    return scheduler_config, unet_config, weights


def load_diffusers_folder(
    path: str | os.PathLike, integer_timesteps: bool = False
) -> tuple[DiscreteEpsDenoiser, VPDiscrete, tuple[int, int, int], str]:
    """(denoiser, schedule, image shape, sha256 of the folder's files) for a diffusers DDPM folder.

    `integer_timesteps` rounds off-grid σ to the nearest trained timestep; by default the timestep is fractional
    (log-α interpolation, see `DiscreteEpsDenoiser`), which the UNet's sinusoidal embedding accepts.
    """
    folder = Path(path)
    scheduler_path, unet_path, weights_path = _locate(folder)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError(DIFFUSERS_INSTALL_HINT) from None

    scheduler_config = _read_json(scheduler_path)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{scheduler_path}: prediction_type {quoted(prediction)} is not supported (epsilon only)")
    try:
        schedule = VPDiscrete(betas_from_scheduler_config(scheduler_config))
    except CheckpointError as err:
        raise CheckpointError(f"{scheduler_path}: {err}") from None

    unet_config = _read_json(unet_path)
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise CheckpointError(f"{unet_path}: class-conditional UNets are not supported")
    try:
        image_shape = check_unet_config(unet_config)
    except CheckpointError as err:
        raise CheckpointError(f"{unet_path}: {err}") from None
    try:
        with torch.device("meta"):
            unet = UNet2DModel.from_config(unet_config)
    except Exception as err:  # diffusers rejects a bad config with assorted exception types
        raise CheckpointError(f"{unet_path}: cannot build UNet2DModel ({type(err).__name__}: {one_line(err)})") from None
    state_dict = convert_legacy_attention_names(_read_weights(weights_path))
    mismatch = state_dict_mismatch(unet.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{weights_path}: weights do not match unet/config.json: {mismatch}")
    unet.load_state_dict(state_dict, strict=True, assign=True)
    unet = unet.float().eval().requires_grad_(False)
    files = [f for f in (folder / "model_index.json", scheduler_path, unet_path, weights_path) if f.is_file()]
    denoiser = DiscreteEpsDenoiser(DiffusersEpsModel(unet), schedule, integer_timesteps=integer_timesteps)
    return denoiser.eval().requires_grad_(False), schedule, image_shape, _folder_digest(files, folder)
