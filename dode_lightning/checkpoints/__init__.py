"""Pretrained denoisers from checkpoints: one entry point, `load_denoiser(source, path, **options)`.

Config shape — the `denoiser:` section of a run config is exactly the keyword arguments of `load_denoiser`::

    denoiser:
      source: edm_pickle          # edm_pickle | diffusers | diffusers_pipeline | gmm_digits | gmm_digits_flow
      path: checkpoints/edm-cifar10-32x32-cond-vp.pkl
      # options of that source, e.g.
      key: ema

Sources and their options:

* `edm_pickle` — an NVIDIA EDM network pickle (`edm-*.pkl`, `baseline-*.pkl`, `network-snapshot-*.pkl`), read
  without executing anything from the file (`edm_pickle.py`). Options: `key` (snapshot entry, default `'ema'`),
  `device` (default `'cpu'`). Schedule: `EDM(max(0.002, net.sigma_min), min(80, net.sigma_max))`, the range EDM's
  sampler uses.
* `diffusers` — a diffusers DDPM folder (google/ddpm-cifar10-32 layout, safetensors or 2022-era .bin), needs the
  optional dependency diffusers (`diffusers_folder.py`). Options: `integer_timesteps` (round off-grid σ to the
  nearest trained timestep instead of interpolating; default False), `device`. Schedule: `VPDiscrete` of the
  folder's β table.
* `diffusers_pipeline` — a diffusers pipeline folder (`model_index.json`): `DDPMPipeline`/`DDIMPipeline` (as
  `diffusers`), or a latent, text-conditional `StableDiffusionPipeline` (`diffusers_pipeline.py`; needs
  diffusers and transformers). Options: `prompts` (a list, or a text file with one prompt per line) or
  `prompt_embeds` (a safetensors file with `prompt_embeds` (P, L, D) and `negative_prompt_embeds` (1, L, D)),
  `negative_prompt` (default ''), `guidance_scale` (default 7.5, as the pipeline), `unet_batch` (samples per UNet
  call, default all), `integer_timesteps`, `device`.
  The denoiser is the guided UNet in latent space; each seed draws one prompt index as a class label
  (`label_dim` = number of prompts); `decoder` is the VAE. Schedule: `VPDiscrete` of the folder's β table.
  Flow-matching `StableDiffusion3Pipeline` and `FluxPipeline` folders (`flow_pipeline.py`) take `prompt_embeds`
  (with pooled embeddings), `guidance_scale` (SD3: true CFG, default 7; FLUX: embedded guidance, default 3.5),
  `unet_batch` (samples per transformer call) and the flow options `shift` (static shift instead of the folder's)
  or `mu` (dynamic shift instead of the one from the image size), `height`/`width` (pixels). Schedule:
  `FlowMatching` with the folder's time shift.
* `gmm_digits` — the built-in exact Gaussian-mixture denoiser on 8×8 digits (no path). Options:
  `covariance_floor` (default 1e-3), `device`. Schedule: `EDM(0.002, 80)`.
* `gmm_digits_flow` — the same mixture as an exact flow-matching velocity field (`flow.py`; x_t = (1 − t)·x₀ + t·ε,
  v = ε − x₀ from the exact posterior, finite at t = 1). Options: `shift` (static time shift, default 1; SD3
  uses 3), `mu` and `time_shift_type` (dynamic shift as FLUX, instead of `shift`), `covariance_floor`, `device`.
  Schedule: `FlowMatching` with that shift; the default grid starts at t = 1 (σ = ∞).

Paths: `package:<relative path>` names a file shipped inside the package (`package:data/edm_digits_net.pkl`); in a
config file, a relative path is relative to that file (the command lines resolve it, `config_relative`); otherwise
relative to the working directory. A "not found" names the directory it looked in.

Every source returns a `LoadedDenoiser` whose `denoiser(x, sigma, class_labels=None)` is the package's denoiser
interface (x in VE form, returns x̂₀), in eval mode with gradients off.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..schedules import EDM, FlowMatching, Schedule
from .errors import CheckpointError, RefusedGlobalError

__all__ = ["LoadedDenoiser", "load_denoiser", "package_path", "config_relative", "SOURCES", "CheckpointError", "RefusedGlobalError"]

EDM_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
# A denoiser path starting with this names a file shipped inside the package, e.g. `package:data/edm_digits_net.pkl`.
PACKAGE_PREFIX = "package:"


@dataclass
class LoadedDenoiser:
    """A denoiser ready for the solvers, with what a run needs to know about it."""

    denoiser: nn.Module
    """`denoiser(x, sigma, class_labels=None) -> x̂₀`, eval mode, requires_grad False."""
    image_shape: tuple[int, int, int]
    """(C, H, W) of one sample."""
    label_dim: int
    """Number of classes for one-hot `class_labels`; 0 = unconditional."""
    schedule: Schedule
    """Noise schedule the model was trained on (its σ range bounds the solver grids)."""
    identity: str
    """sha256 of the checkpoint file(s), or the built-in model's name."""
    source: str
    """The `source` it was loaded from."""
    decoder: nn.Module | None = None
    """Latent models: `decoder(latents) -> images in [−1, 1]` (the VAE); used for images only, never in a fit."""
    output_shape: tuple[int, int, int] | None = None
    """Latent models: (C, H, W) of a decoded image; `image_shape` is then the latent shape."""
    conditioning: dict[str, Any] = field(default_factory=dict)
    """What the denoiser is conditioned with (guidance scale, prompt source); recorded in the λ file."""


def package_path(path: str | os.PathLike) -> Path:
    """`package:<relative path>` → that file inside the installed dode_lightning package (its shipped data, wherever
    it is installed); any other path as given, `~` expanded."""
    text = os.fspath(path)
    if text.startswith(PACKAGE_PREFIX):
        return Path(__file__).resolve().parents[1] / text[len(PACKAGE_PREFIX) :]
    return Path(text).expanduser()


def config_relative(denoiser: Any, config_dir: str | os.PathLike) -> Any:
    """A config file's `denoiser` section with its relative file options (path, a prompts file, prompt_embeds)
    made relative to `config_dir`, the folder of that config file; anything else is returned unchanged."""
    if not isinstance(denoiser, dict):
        return denoiser
    resolved = dict(denoiser)
    for key in ("path", "prompts", "prompt_embeds"):
        value = resolved.get(key)
        if isinstance(value, str) and value and not value.startswith((PACKAGE_PREFIX, "~")) and not Path(value).is_absolute():
            resolved[key] = os.path.normpath(Path(config_dir).absolute() / value)
    return resolved


def _require_path(source: str, path: str | os.PathLike | None, expected: str) -> Path:
    """The checkpoint path, absolute, so that a "not found" names the directory it looked in."""
    if path is None:
        raise ValueError(f"source {source!r} needs a path: {expected}")
    return package_path(path).absolute()


def _load_edm_pickle(path: str | os.PathLike | None, key: str = "ema", device: str = "cpu") -> LoadedDenoiser:
    from .edm_pickle import load_edm_network

    expected = f"an EDM network pickle such as edm-cifar10-32x32-cond-vp.pkl, public release at {EDM_RELEASE_URL}"
    file = _require_path("edm_pickle", path, expected)
    if not file.is_file():
        if os.fspath(path).startswith(PACKAGE_PREFIX):
            raise FileNotFoundError(f"{path} not found: {file.name} is missing from the installed package in {file.parent}; reinstall dode-lightning")
        raise FileNotFoundError(f"EDM network pickle {file.name} not found in {file.parent}/; expected {expected}")
    net, digest = load_edm_network(file, key=key)
    schedule = EDM(max(0.002, float(net.sigma_min)), min(80.0, float(net.sigma_max)))
    image_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    return LoadedDenoiser(net.to(device), image_shape, int(net.label_dim), schedule, digest, "edm_pickle")


def _load_diffusers(path: str | os.PathLike | None, integer_timesteps: bool = False, device: str = "cpu") -> LoadedDenoiser:
    from .diffusers_folder import load_diffusers_folder

    folder = _require_path("diffusers", path, "a diffusers DDPM folder such as google/ddpm-cifar10-32 from the Hugging Face hub")
    denoiser, schedule, image_shape, digest = load_diffusers_folder(folder, integer_timesteps=integer_timesteps)
    return LoadedDenoiser(denoiser.to(device), image_shape, 0, schedule, digest, "diffusers")


def _load_diffusers_pipeline(
    path: str | os.PathLike | None,
    prompts: list[str] | str | None = None,
    prompt_embeds: str | None = None,
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    integer_timesteps: bool = False,
    unet_batch: int | None = None,
    shift: float | None = None,
    mu: float | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str = "cpu",
) -> LoadedDenoiser:
    from .diffusers_pipeline import SD_HUB_NAME, load_pipeline_folder

    folder = _require_path("diffusers_pipeline", path, f"a diffusers pipeline folder such as {SD_HUB_NAME} from the Hugging Face hub")
    flow_options = {"shift": shift, "mu": mu, "height": height, "width": width}
    loaded = load_pipeline_folder(folder, prompts, prompt_embeds, negative_prompt, guidance_scale, integer_timesteps, unet_batch, flow_options)
    loaded.denoiser.to(device)
    if loaded.decoder is not None:
        loaded.decoder.to(device)
    return loaded


def _load_gmm_digits(path: str | os.PathLike | None, covariance_floor: float = 1e-3, device: str = "cpu") -> LoadedDenoiser:
    from ..gmm import DIGITS_SHAPE, digits_mixture

    if path is not None:
        raise ValueError("source 'gmm_digits' is built in and takes no path")
    mixture = digits_mixture(covariance_floor).eval().requires_grad_(False)
    identity = "gmm_digits" if covariance_floor == 1e-3 else f"gmm_digits(covariance_floor={covariance_floor})"
    return LoadedDenoiser(mixture.to(device), DIGITS_SHAPE, mixture.label_dim, EDM(0.002, 80.0), identity, "gmm_digits")


def _load_gmm_digits_flow(
    path: str | os.PathLike | None,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    covariance_floor: float = 1e-3,
    device: str = "cpu",
) -> LoadedDenoiser:
    from ..flow import ExactFlowMixture

    loaded = _load_gmm_digits(path, covariance_floor, device)
    schedule = FlowMatching(shift, mu, time_shift_type)
    denoiser = ExactFlowMixture(loaded.denoiser).eval().requires_grad_(False)
    return LoadedDenoiser(
        denoiser, loaded.image_shape, loaded.label_dim, schedule, f"{loaded.identity}:flow", "gmm_digits_flow",
        conditioning={"time_shift": schedule.time_shift},
    )


SOURCES: dict[str, Callable[..., LoadedDenoiser]] = {
    "edm_pickle": _load_edm_pickle,
    "diffusers": _load_diffusers,
    "diffusers_pipeline": _load_diffusers_pipeline,
    "gmm_digits": _load_gmm_digits,
    "gmm_digits_flow": _load_gmm_digits_flow,
}


def load_denoiser(source: str, path: str | os.PathLike | None = None, **options: Any) -> LoadedDenoiser:
    """Load a denoiser from `source` (`edm_pickle`, `diffusers`, `diffusers_pipeline`, `gmm_digits`); options per source in the module doc.

    Raises FileNotFoundError for a missing checkpoint (naming the expected file and the public release),
    `CheckpointError` (a ValueError) for a file that is malformed or of the wrong format, ValueError for an
    unknown source or option, ImportError naming the install command when an optional dependency is missing.
    """
    loader = SOURCES.get(source)
    if loader is None:
        raise ValueError(f"unknown denoiser source {source!r}; choose one of {', '.join(SOURCES)}")
    accepted = [name for name in inspect.signature(loader).parameters if name != "path"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for source {source!r}; accepted: {', '.join(accepted)}")
    return loader(path, **options)
