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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoisers import Denoiser, DiscreteEpsDenoiser
from ..schedules import VPDiscrete, cosine_betas
from .errors import CheckpointError, one_line, state_dict_mismatch

__all__ = [
    "DIFFUSERS_INSTALL_HINT",
    "DiffusersEpsModel",
    "DiffusersDDIMClip",
    "betas_from_scheduler_config",
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


def betas_from_scheduler_config(config: dict[str, Any]) -> Tensor:
    """β_0…β_{T−1} (float64 holding diffusers' float32 values) from a DDPM/DDIM scheduler config."""
    if config.get("rescale_betas_zero_snr"):
        raise CheckpointError("scheduler uses rescale_betas_zero_snr, which is not supported")
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = cosine_betas(steps).to(torch.float32)
    else:
        raise CheckpointError(f"unsupported beta_schedule {schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")
    return betas.to(torch.float64)


def convert_legacy_attention_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename 2022-era attention parameters (…attentions.N.query.weight → …attentions.N.to_q.weight, etc.)."""
    converted = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
        converted[name] = value
    return converted


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_weights(path: Path) -> dict[str, Tensor]:
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
        raise CheckpointError(f"{scheduler_path}: prediction_type {prediction!r} is not supported (epsilon only)")
    schedule = VPDiscrete(betas_from_scheduler_config(scheduler_config))

    unet_config = _read_json(unet_path)
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise CheckpointError(f"{unet_path}: class-conditional UNets are not supported")
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
    if unet.config.in_channels != unet.config.out_channels:
        raise CheckpointError(f"{unet_path}: in_channels != out_channels, not an ε-model of the image")

    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    image_shape = (int(unet.config.in_channels), int(height), int(width))
    files = [f for f in (folder / "model_index.json", scheduler_path, unet_path, weights_path) if f.is_file()]
    denoiser = DiscreteEpsDenoiser(DiffusersEpsModel(unet), schedule, integer_timesteps=integer_timesteps)
    return denoiser.eval().requires_grad_(False), schedule, image_shape, _folder_digest(files, folder)
