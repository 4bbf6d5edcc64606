"""ComfyUI custom nodes (issue 19 item 3): the node contract, checked with a stand-in `comfy.samplers` (ComfyUI itself
is not a package this environment can install)."""
import sys
import types

import pytest
import torch

from dode_lightning.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from dode_lightning.lambda_file import LambdaFileError
from dode_lightning.schedules import EDM, make_schedule
from tests.conftest import unit_noise
from tests.test_k_diffusion import _lambda_file


class KSAMPLER:
    """ComfyUI's `comfy.samplers.KSAMPLER(sampler_function, extra_options={}, inpaint_options={})` as its `sample`
    calls the function: `extra_args["denoise_mask"]` set, the model wrapped as `KSamplerX0Inpaint` (called with
    `denoise_mask`, `model_options`, `seed`), `sampler_function(model_k, noise, sigmas, extra_args=..., callback=...,
    disable=..., **extra_options)` with the noise already scaled (here: σ₀·noise, an EDM model)."""

    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006 (ComfyUI's signature)
        self.sampler_function, self.extra_options, self.inpaint_options = sampler_function, extra_options, inpaint_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask

        def model_k(x, sigma, denoise_mask, model_options={}, seed=None):  # noqa: B006
            return model_wrap(x, sigma)

        return self.sampler_function(model_k, noise * sigmas[0], sigmas, extra_args=extra_args, callback=callback, disable=disable_pbar, **self.extra_options)


@pytest.fixture
def comfy(monkeypatch):
    package, samplers = types.ModuleType("comfy"), types.ModuleType("comfy.samplers")
    samplers.KSAMPLER = KSAMPLER
    package.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", package)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)


def test_mappings_and_node_declarations():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {"DODESampler", "DODESigmas"}
    for name, node in NODE_CLASS_MAPPINGS.items():
        inputs = node.INPUT_TYPES()
        assert inputs["required"]["lambda_file"][0] == "STRING"
        assert callable(getattr(node(), node.FUNCTION)) and isinstance(node.CATEGORY, str)
    assert NODE_CLASS_MAPPINGS["DODESampler"].RETURN_TYPES == ("SAMPLER",)
    assert NODE_CLASS_MAPPINGS["DODESigmas"].RETURN_TYPES == ("SIGMAS",)


def test_sampler_and_sigmas_nodes_run_the_calibrated_solver(comfy, tmp_path, digits):
    path, solver, lambdas = _lambda_file(tmp_path, "heun", 5, EDM())
    (sampler,) = NODE_CLASS_MAPPINGS["DODESampler"]().run(str(path))
    (sigmas,) = NODE_CLASS_MAPPINGS["DODESigmas"]().run(f" {path} ")
    assert isinstance(sampler, KSAMPLER) and sampler.extra_options == {} and sampler.inpaint_options == {}
    assert sigmas.dtype == torch.float32 and sigmas.dim() == 1 and float(sigmas[-1]) == 0
    noise, steps = unit_noise(2), []
    out = sampler.sample(digits, sigmas.double(), {"model_options": {}, "seed": 0}, steps.append, noise, disable_pbar=True)
    assert [c["i"] for c in steps] == list(range(len(sigmas) - 1))
    torch.testing.assert_close(out, solver.sample(digits, noise, lambdas), rtol=1e-10, atol=1e-10)


def test_discrete_calibration_without_integer_timesteps_is_refused(comfy, tmp_path):
    path, _, _ = _lambda_file(tmp_path, "ddim", 4, make_schedule("vp_linear"))
    for node in ("DODESampler", "DODESigmas"):
        with pytest.raises(LambdaFileError, match="integer_timesteps") as err:
            NODE_CLASS_MAPPINGS[node]().run(str(path))
        assert "\n" not in str(err.value)
    with pytest.raises(LambdaFileError, match="does not exist"):
        NODE_CLASS_MAPPINGS["DODESigmas"]().run(str(tmp_path / "missing.safetensors"))
