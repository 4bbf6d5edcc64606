"""`DODEScheduler` under diffusers' conventions (issue 19 item 4), against diffusers' own schedulers.

Scheduler loops run as a pipeline runs them (latents × init_noise_sigma, scale_model_input, step) on a small fixed
random convolutional "network", so that every scheduler sees the same model. Differences are relative to the
largest final latent; the loops run in float32 as pipelines do, so ~1e-6 is the float32 floor.
"""
import json
import math
import re

import numpy as np
import pytest
import torch

from dode_lightning.lambda_file import LAMBDA_LIMIT, save_lambdas
from dode_lightning.lambda_file import schedule_id as describe_schedule
from dode_lightning.solvers import make_solver

diffusers = pytest.importorskip("diffusers")
from dode_lightning import DODEScheduler, export_scheduler  # noqa: E402
from dode_lightning.diffusers_scheduler import SchedulerConfigError  # noqa: E402

# diffusers' Euler/Heun/DPM schedulers call np.array on a torch tensor (numpy 2 asks torch's __array__ for `copy`).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's β table


def network(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 4-channel map of (input, timestep), standing in for a UNet."""
    weight = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    t = torch.as_tensor(t, dtype=torch.float32)
    h = torch.nn.functional.conv2d(latents.float(), weight, padding=1)
    return torch.tanh(h) + 0.1 * torch.sin(t / 150.0) * latents.float()


def run(scheduler, steps: int | None = None, seed: int = 0, shape=(2, 4, 8, 8), **grid) -> torch.Tensor:
    """The final latents of a pipeline-style loop from unit noise."""
    scheduler.set_timesteps(steps, **grid) if steps is not None else scheduler.set_timesteps(**grid)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = network(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(output, t, latents).prev_sample
    return latents


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


# --- the plain swap idiom reproduces the replaced scheduler (grid, start, method) at λ ≡ 0 ---------------------------


SWAPS = [
    ("DDIMScheduler", dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False), 8),  # SD v1
    ("DDIMScheduler", dict(**SD, timestep_spacing="trailing", clip_sample=False), 8),
    ("EulerDiscreteScheduler", dict(**SD, steps_offset=1, timestep_spacing="leading"), 8),  # SDXL's
    ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="trailing"), 8),
    ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="linspace"), 8),
    ("EulerDiscreteScheduler", dict(**SD, use_karras_sigmas=True), 8),
    ("HeunDiscreteScheduler", dict(**SD, steps_offset=1, timestep_spacing="leading"), 5),
    ("HeunDiscreteScheduler", dict(**SD, timestep_spacing="trailing"), 5),
    ("HeunDiscreteScheduler", dict(**SD, timestep_spacing="linspace"), 5),
    ("DPMSolverMultistepScheduler", dict(**SD, steps_offset=1), 8),
    ("EDMEulerScheduler", dict(), 8),
    ("EDMEulerScheduler", dict(sigma_max=14.6, prediction_type="v_prediction"), 8),
    ("EDMDPMSolverMultistepScheduler", dict(), 8),  # Playground v2.5's kind of config
]


@pytest.mark.parametrize("name,options,steps", SWAPS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items() if k not in SD)}" for n, o, _ in SWAPS])
def test_swapped_in_scheduler_reproduces_the_replaced_one(name, options, steps):
    reference = getattr(diffusers, name)(**options)
    ours = DODEScheduler.from_config(reference.config)
    theirs_final = run(reference, steps)
    ours_final = run(ours, steps)
    distinct = torch.unique_consecutive(reference.timesteps.double())
    assert torch.allclose(torch.unique_consecutive(ours.timesteps.double()), distinct, rtol=1e-6, atol=1e-6)
    diff = relative(ours_final, theirs_final)
    print(f"\n{name} {options} {steps} steps vs DODEScheduler.from_config (solver {ours.config.solver}, λ ≡ 0): max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-5


@pytest.mark.parametrize("reference", [lambda: diffusers.EDMEulerScheduler(), lambda: diffusers.HeunDiscreteScheduler(**SD, timestep_spacing="trailing")])
def test_a_swapped_in_scheduler_saves_and_loads_with_its_replaced_schedulers_grid(tmp_path, reference):
    swapped = DODEScheduler.from_config(reference().config)
    swapped.save_pretrained(tmp_path)
    for again in (DODEScheduler.from_pretrained(tmp_path), DODEScheduler.from_config(swapped.config)):
        for scheduler in (swapped, again):
            scheduler.set_timesteps(5)
        assert again.config.base_scheduler == swapped.config.base_scheduler and again.config.solver == swapped.config.solver
        assert torch.equal(again.timesteps, swapped.timesteps) and again.init_noise_sigma == swapped.init_noise_sigma


def test_ddim_swap_uses_ddims_timesteps_not_the_packages():
    """SD v1's leading spacing with steps_offset 1: DDIM's 876…1, not 875…0."""
    ours = DODEScheduler.from_config(diffusers.DDIMScheduler(**SD, steps_offset=1).config)
    ours.set_timesteps(8)
    assert ours.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]
    assert ours.config.base_scheduler == "DDIMScheduler"


# --- configs refused in one line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,message",
    [
        (lambda: diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config, "stochastic flow sampling"),
        (lambda: diffusers.ScoreSdeVeScheduler().config, "score-SDE VE"),
        (lambda: diffusers.DDIMScheduler(rescale_betas_zero_snr=True).config, "zero terminal SNR"),
        (lambda: diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True).config, "zero terminal SNR"),
        (lambda: diffusers.EDMEulerScheduler(prediction_type="sample").config, "EDM config"),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(config, message):
    with pytest.raises(SchedulerConfigError, match=message) as err:
        DODEScheduler.from_config(config())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options,message", [(dict(steps_offset=5000), "outside 0 … 999"), (dict(timestep_spacing="sideways"), "cannot make a grid of 4 steps")])
def test_a_replaced_schedulers_options_that_give_no_grid_are_refused(options, message):
    scheduler = DODEScheduler.from_config(diffusers.DDIMScheduler(**SD).config, **options)
    with pytest.raises(SchedulerConfigError, match=message) as err:
        scheduler.set_timesteps(4)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(base_scheduler="StableDiffusionPipeline"), "base_scheduler is"),
        (dict(base_config={"sigma_max": 1e300}), "sigma_min, sigma_max are"),
        (dict(base_config={"sigma_min": "a"}), "sigma_min, sigma_max are"),
        (dict(base_config={"rho": -7}), "rho is -7"),
    ],
)
def test_hostile_edm_and_base_options_are_refused_in_one_line(change, message):
    config = {**DODEScheduler.from_config(diffusers.EDMEulerScheduler().config).config, **change}
    with pytest.raises(SchedulerConfigError, match=message) as err:
        DODEScheduler.from_config(config)
    assert "\n" not in str(err.value)


def test_edm_config_runs_in_sigma_space():
    ours = DODEScheduler.from_config(diffusers.EDMEulerScheduler().config)
    ours.set_timesteps(4)
    assert ours.parameterization.kind == "edm" and ours.schedule.sigma_max == 80.0
    assert torch.allclose(ours.timesteps, 0.25 * torch.log(ours.sigmas[:-1]))  # c_noise
    x = torch.ones(1, 4, 2, 2)
    sigma = float(ours.sigmas[0])
    assert torch.allclose(ours.scale_model_input(x, ours.timesteps[0]), x / math.sqrt(sigma**2 + 0.25))  # c_in


# --- custom grids: diffusers' σ form, timesteps= ----------------------------------------------------------------------


def test_sigmas_in_diffusers_form_ending_in_zero():
    ays = diffusers.schedulers.scheduling_utils.AysSchedules["StableDiffusionSigmas"]
    assert ays[-1] == 0.0
    ours = DODEScheduler.from_config(diffusers.EulerDiscreteScheduler(**SD).config)
    theirs = diffusers.EulerDiscreteScheduler(**SD)
    diff = relative(run(ours, sigmas=ays), run(theirs, sigmas=ays))
    print(f"\nAYS sigmas (ending in 0), EulerDiscreteScheduler vs DODEScheduler: max |Δ| / max |x| = {diff:.1e}")
    assert len(ours.timesteps) == len(ays) - 1 and ours.sigmas.tolist() == pytest.approx(ays, rel=1e-6)
    assert diff < 2e-5


def test_a_lambda_scheduler_accepts_its_own_sigmas_in_diffusers_form():
    probe = DODEScheduler(**SD, base_scheduler=None)
    probe.set_timesteps(5)
    grid = probe.solver.sigmas.tolist()
    scheduler = DODEScheduler(**SD, nfe=5, sigmas=grid, lambdas=[0.1] * 5)
    scheduler.set_timesteps(sigmas=grid)  # diffusers' form, ending in 0
    scheduler.set_timesteps(sigmas=grid[:-1])  # evaluation starts only: 0 appended
    with pytest.raises(SchedulerConfigError, match="fitted on the grid"):
        scheduler.set_timesteps(sigmas=[s * 0.9 for s in grid])


# --- step() and set_timesteps() arguments -----------------------------------------------------------------------------


@pytest.fixture
def running():
    scheduler = DODEScheduler(**SD)
    scheduler.set_timesteps(4)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    return scheduler, scheduler.step(network(latents, t), t, latents).prev_sample


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (4, 8, 8), (), (2, 4, 8, 4)])
def test_model_output_of_another_shape_is_refused(running, shape):
    scheduler, latents = running
    t = scheduler.timesteps[1]
    with pytest.raises(SchedulerConfigError, match="model_output has shape") as err:
        scheduler.step(torch.zeros(shape), t, latents)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_model_output_is_reported_as_such(running, bad, dtype):
    scheduler, latents = running
    t = scheduler.timesteps[1]
    output = network(latents, t).to(dtype)
    output[0, 0, 0, 0] = bad
    with pytest.raises(SchedulerConfigError, match="NaN or infinite"):
        scheduler.step(output, t, latents)


def test_nan_timestep_is_refused(running):
    scheduler, latents = running
    with pytest.raises(SchedulerConfigError, match="got timestep nan"):
        scheduler.step(network(latents, 0), torch.tensor(math.nan), latents)


def test_latents_edited_in_place_between_steps_are_refused(running):
    scheduler, latents = running
    t = scheduler.timesteps[1]
    latents[0, 0, 0, 0] += 1.0
    with pytest.raises(SchedulerConfigError, match="latents changed between steps"):
        scheduler.step(network(latents, t), t, latents)


def test_large_finite_fp16_outputs_are_not_mistaken_for_overflow(running):
    scheduler, latents = running
    t = scheduler.timesteps[1]
    scheduler.step(torch.full(latents.shape, 6e4, dtype=torch.float16), t, latents)  # their fp16 sum would be inf


def test_unchanged_latents_continue(running):
    scheduler, latents = running
    t = scheduler.timesteps[1]
    scheduler.step(network(latents, t), t, latents.clone())  # an equal copy is the same state


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(timesteps=[900, math.nan, 300]), "timesteps holds"),
        (dict(timesteps=[1200, 800, 300]), "timesteps holds"),
        (dict(timesteps=[300, 800]), "timesteps holds"),
        (dict(num_inference_steps=4.5), "num_inference_steps is 4.5"),
        (dict(num_inference_steps=True), "num_inference_steps is true"),
        (dict(num_inference_steps=1001), "num_inference_steps is 1001"),
        (dict(num_inference_steps=0), "num_inference_steps is 0"),
        (dict(num_inference_steps=4, timesteps=[900, 500]), "pass one of them"),
        (dict(sigmas=[5.0, math.nan, 0.0]), "sigmas holds"),
        (dict(sigmas=[1.0, 5.0, 0.0]), "sigmas holds"),
        (dict(sigmas=["a"]), "sigmas must be a list of numbers"),
    ],
)
def test_bad_set_timesteps_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SchedulerConfigError, match=message) as err:
        DODEScheduler(**SD).set_timesteps(**kwargs)
    assert "\n" not in str(err.value)


def test_numpy_and_tensor_step_counts_are_integers():
    scheduler = DODEScheduler(**SD)
    for steps in (np.int64(4), torch.tensor(4)):
        scheduler.set_timesteps(steps)
        assert scheduler.num_inference_steps == 4 and type(scheduler.num_inference_steps) is int


def test_add_noise_is_refused_in_one_line():
    with pytest.raises(SchedulerConfigError, match="img2img or inpainting"):
        DODEScheduler(**SD).add_noise(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([500]))


def test_api_before_and_after_set_timesteps():
    scheduler = DODEScheduler(**SD, solver="heun")
    assert scheduler.timesteps is None and scheduler.step_index is None and scheduler.sigmas is None
    scheduler.set_timesteps(3)
    assert scheduler.step_index == 0
    assert isinstance(scheduler.sigmas, torch.Tensor) and len(scheduler.sigmas) == len(scheduler.timesteps) + 1
    assert float(scheduler.sigmas[-1]) == 0.0 and float(scheduler.sigmas[1]) == float(scheduler.sigmas[2])  # Heun's


# --- config validation: one line naming the field and the allowed values ----------------------------------------------


@pytest.fixture
def saved(tmp_path):
    probe = DODEScheduler(solver="ddim")
    probe.set_timesteps(5)
    DODEScheduler(solver="ddim", nfe=5, sigmas=probe.solver.sigmas.tolist(), lambdas=[0.1] * 5, guidance_scale=7.5).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lambdas": [1e7] * 5}, re.escape(f"within ±{LAMBDA_LIMIT:g}")),
        ({"lambdas": [10**400] * 5}, "a value in lambdas"),
        ({"lambdas": [True] * 5}, "not true/false"),
        ({"history": [1]}, "history is \\[1\\]; allowed: an integer"),
        ({"history": 1.5}, "history is 1.5; allowed: an integer"),
        ({"solver": {}}, "solver is {}; allowed: one of"),
        ({"integer_timesteps": "no"}, 'integer_timesteps is "no"; allowed: true or false'),
        ({"guidance_scale": math.nan}, "guidance_scale is nan; allowed: a finite number"),
        ({"guidance_scale": -1.0}, "guidance_scale is -1.0"),
        ({"nfe": "4"}, 'nfe is "4"; allowed: an integer'),
        ({"state_dtype": "float16"}, "state_dtype"),
        ({"sigmas_scale": 0.9}, "grid_digest differs"),  # the same λ on σ × 0.9
    ],
)
def test_bad_config_fields_are_refused_in_one_line(saved, change, message):
    path = saved / "scheduler_config.json"
    config = json.loads(path.read_text())
    if "sigmas_scale" in change:
        config["sigmas"] = [s * change["sigmas_scale"] for s in config["sigmas"]]
    else:
        config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(SchedulerConfigError, match=message) as err:
        DODEScheduler.from_pretrained(saved)
    assert "\n" not in str(err.value)


def test_oversized_scheduler_config_is_refused(saved):
    path = saved / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["calibration"] = {"padding": "x" * (2 << 20)}
    path.write_text(json.dumps(config))
    with pytest.raises(SchedulerConfigError, match="larger than"):
        DODEScheduler.from_pretrained(saved)


def test_export_refuses_a_prediction_type_mismatch(tmp_path):
    folder = tmp_path / "pipe"
    diffusers.DDIMScheduler(**SD, prediction_type="epsilon").save_pretrained(folder / "scheduler")
    schedule = DODEScheduler(**SD).schedule
    lambdas = save_lambdas(tmp_path / "v.safetensors", {"lambdas": torch.zeros(4, dtype=torch.float64), "sigmas": make_solver("ddim", 4, schedule).sigmas},
                           {"solver": "ddim", "nfe": 4, "schedule": describe_schedule(schedule), "prediction_type": "v_prediction"})
    with pytest.raises(SchedulerConfigError, match="prediction_type 'epsilon', but .* 'v_prediction'") as err:
        export_scheduler(lambdas, folder)
    assert "\n" not in str(err.value)
