"""ComfyUI custom nodes: a λ file's calibrated D-solver as a `SAMPLER` and its σ list as `SIGMAS`.

For `SamplerCustom` / `SamplerCustomAdvanced`: "D-ODE sampler (λ file)" → sampler, "D-ODE sigmas (λ file)" →
sigmas, both from the same file. ComfyUI calls discrete-time (ε / v) models at the nearest integer timestep, so
such calibrations must be made with the denoiser option `integer_timesteps: true`; other files are refused in one
line. Install: see the README ("ComfyUI"). ComfyUI's own modules are imported only when a node runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ..k_diffusion import sampler_from_lambda_file

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "DODESampler", "DODESigmas"]

CATEGORY = "sampling/custom_sampling"
LAMBDA_FILE = ("STRING", {"default": "", "multiline": False, "tooltip": "path of a λ file (.safetensors) written by train.py"})


class _LambdaFileNode:
    """A node reading one λ file (its path, as a string); subclasses turn (sampler, σ list) into their output."""

    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {"required": {"lambda_file": LAMBDA_FILE}}

    def run(self, lambda_file: str) -> tuple[Any]:
        return (self.output(*sampler_from_lambda_file(Path(lambda_file.strip()).expanduser(), require_integer_timesteps=True)),)


class DODESampler(_LambdaFileNode):
    """A λ file's calibrated D-solver as a ComfyUI `SAMPLER` (comfy.samplers.KSAMPLER around the k-diffusion sampler)."""

    RETURN_TYPES = ("SAMPLER",)
    CATEGORY = f"{CATEGORY}/samplers"

    @staticmethod
    def output(sample: Any, sigmas: Tensor) -> Any:
        import comfy.samplers

        return comfy.samplers.KSAMPLER(sample, extra_options={}, inpaint_options={})


class DODESigmas(_LambdaFileNode):
    """The σ list a λ file was calibrated on, as ComfyUI `SIGMAS` (float32, descending, ending in 0)."""

    RETURN_TYPES = ("SIGMAS",)
    CATEGORY = f"{CATEGORY}/schedulers"

    @staticmethod
    def output(sample: Any, sigmas: Tensor) -> Tensor:
        return sigmas.float()


NODE_CLASS_MAPPINGS = {"DODESampler": DODESampler, "DODESigmas": DODESigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"DODESampler": "D-ODE sampler (λ file)", "DODESigmas": "D-ODE sigmas (λ file)"}
