"""`DODEScheduler` (issue 11): the package's solvers inside diffusers pipelines, `export_scheduler` and its CLI.

Pipeline runs use the tiny-ddpm fixture (random float32 UNet, outputs of magnitude ~300), so differences are reported
relative to the largest latent: float32 arithmetic on either side gives ~1e-7 of it per step.
"""
import inspect
import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dode_lightning.cli import train_main
from dode_lightning.denoisers import DiscreteEpsDenoiser
from dode_lightning.distill import seeded_noise
from dode_lightning.lambda_file import LambdaFileError, load_lambdas, save_lambdas
from dode_lightning.lambda_file import schedule_id as describe_schedule
from dode_lightning.sample_cli import export_scheduler_main, sample_main
from dode_lightning.sampling import ImageStore, to_uint8
from dode_lightning.solvers import SOLVERS, LambdaLayout, make_solver
from tests.conftest import fixture_path, unit_noise

diffusers = pytest.importorskip("diffusers")
from dode_lightning import DODEScheduler, export_scheduler, load_denoiser  # noqa: E402
from dode_lightning.diffusers_scheduler import SchedulerConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:LightningCLI's args parameter", "ignore:Found .* module\\(s\\) in eval mode"
)
ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def folder() -> Path:
    return fixture_path("diffusers", "tiny-ddpm")


@pytest.fixture(scope="module")
def ddpm_pipe(folder):
    """The fixture's DDPMPipeline; `run_pipeline` swaps its scheduler, so configs come from `ddpm_config`."""
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ddpm_config(folder):
    """The folder's own DDPMScheduler config (linear β, clip_sample), as `pipe.scheduler.config` holds it."""
    return diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config


def recorded(pipe, scheduler) -> list[torch.Tensor]:
    """Install `scheduler` in `pipe`; the returned list receives the latents after every `step()` it makes."""
    pipe.scheduler = scheduler
    trajectory: list[torch.Tensor] = []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        trajectory.append((out.prev_sample if kwargs.get("return_dict", True) else out[0]).clone())
        return out

    scheduler.step = recording_step
    return trajectory


def run_pipeline(pipe, scheduler, steps: int, seeds=SEEDS) -> list[torch.Tensor]:
    """The latents after every `step()` of a pipeline run with `scheduler`, one generator per seed."""
    trajectory = recorded(pipe, scheduler)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="pt")
    return trajectory


def relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert len(ours) == len(theirs)
    return max(float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(ours, theirs))


# --- λ ≡ 0 against diffusers' schedulers and the base solver, in real pipelines ---------------------------------------


def test_zero_lambda_matches_ddim_scheduler_in_ddim_pipeline(ddpm_pipe, ddpm_config):
    config = ddpm_config
    pipe = diffusers.DDIMPipeline(ddpm_pipe.unet, diffusers.DDPMScheduler.from_config(config))
    pipe.set_progress_bar_config(disable=True)
    theirs = run_pipeline(pipe, diffusers.DDIMScheduler.from_config(config, clip_sample=False), 10)
    ours = run_pipeline(pipe, DODEScheduler.from_config(config), 10)
    diff = relative_difference(ours, theirs)
    print(f"\nDDIMScheduler (η = 0, no clipping) vs DODEScheduler ddim λ ≡ 0, 10 steps: max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-6


MULTISTEP_REFERENCES = {
    "dpm_solver_pp_2m": lambda config: diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2),
    "dpm_solver_pp_3m": lambda config: diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=3),
    "unipc_2": lambda config: diffusers.UniPCMultistepScheduler.from_config(config, solver_order=2, solver_type="bh2", predict_x0=True),
    "unipc_3": lambda config: diffusers.UniPCMultistepScheduler.from_config(config, solver_order=3, solver_type="bh2", predict_x0=True),
}


@pytest.mark.parametrize("solver", sorted(MULTISTEP_REFERENCES))
def test_zero_lambda_matches_multistep_schedulers_in_ddpm_pipeline(ddpm_pipe, ddpm_config, solver):
    """DPM-Solver++ and UniPC (whose pipeline latents are its predictions, not its corrected states)."""
    reference = MULTISTEP_REFERENCES[solver](ddpm_config)
    reference.set_timesteps(10)
    if "generator" not in inspect.signature(reference.step).parameters:  # DDPMPipeline passes it to every scheduler
        plain_step = reference.step
        reference.step = lambda *args, generator=None, **kwargs: plain_step(*args, **kwargs)
    # Its grid (timesteps of its own spacing rule, then σ = 0) stored as our grid: σ(t) in float64 at the same t.
    schedule = DODEScheduler.from_config(ddpm_config).schedule  # the pipeline's β table, float32 values as diffusers'
    sigmas = schedule.sigma(reference.timesteps.double()).tolist() + [0.0]
    ours_scheduler = DODEScheduler.from_config(ddpm_config, solver=solver, sigmas=sigmas)
    theirs = run_pipeline(ddpm_pipe, reference, 10)
    ours = run_pipeline(ddpm_pipe, ours_scheduler, 10)
    assert torch.equal(ours_scheduler.timesteps, reference.timesteps)
    diff = relative_difference(ours, theirs)
    print(f"\n{type(reference).__name__} vs DODEScheduler {solver} λ ≡ 0, 10 steps: max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-6


def test_abandoned_run_ends_and_run_errors_reach_the_caller(digits, vp):
    scheduler = DODEScheduler(solver="unipc_3")
    scheduler.set_timesteps(5)
    model = exact_model(digits, vp, "epsilon")
    x = unit_noise(2, seed=9)
    threads = threading.active_count()
    x = scheduler.step(model(x, scheduler.timesteps[0]), scheduler.timesteps[0], x).prev_sample
    assert threading.active_count() == threads  # the run is the generator, driven in the caller's thread
    scheduler.set_timesteps(5)  # a new run
    x = unit_noise(2, seed=9)
    with pytest.raises(SchedulerConfigError, match="model_output has shape"):  # refused before it reaches the run
        scheduler.step(torch.zeros(2, 1, 4, 4, dtype=torch.float64), scheduler.timesteps[0], x)
    assert threading.active_count() == threads


@pytest.mark.parametrize("solver,steps", [("ddim", 10), ("dpm_solver_2", 6)])
def test_zero_lambda_equals_the_base_solver(ddpm_pipe, ddpm_config, folder, solver, steps):
    # the package's grid, and its float64 state (float32, the default, stays at the float32 floor: scheduler_cost.py)
    scheduler = DODEScheduler.from_config(ddpm_config, solver=solver, base_scheduler=None, state_dtype="float64")
    ours = run_pipeline(ddpm_pipe, scheduler, steps)
    states = []
    noise, _ = seeded_noise(SEEDS, (3, 32, 32))
    with torch.no_grad():
        scheduler.solver.sample(load_denoiser("diffusers", folder).denoiser, noise, observe=lambda k, stage, x: states.append(x))
    diff = relative_difference(ours, states)
    print(f"\nbase {solver} (float64 states) vs DODEScheduler λ ≡ 0 in DDPMPipeline: max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-7  # the pipeline's latents are the float32 rounding of the same states


# --- every solver, every prediction type, with λ: the scheduler loop equals `Solver.sample` -----------------------


@pytest.fixture(scope="module")
def vp():
    """The scheduler's default β table (diffusers' float32 linear betas), on which model and solver both work."""
    return DODEScheduler().schedule


def exact_model(digits, vp, prediction: str):
    """The exact digits mixture as a network on VP latents at (possibly fractional) timesteps t."""

    def model(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_vp.shape[0])  # per sample, as the solvers call it
        sigma = vp.sigma(t).reshape(-1, 1, 1, 1)
        scale = 1 / torch.sqrt(1 + sigma**2)
        x_ve = x_vp / scale
        denoised = digits(x_ve, sigma.reshape(-1))
        eps = (x_ve - denoised) / sigma
        return {"epsilon": eps, "sample": denoised, "v_prediction": scale * eps - scale * sigma * denoised}[prediction]

    return model


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", sorted(SOLVERS))  # UniPC too: it evaluates at a prediction it never yields
def test_scheduler_loop_equals_solver_sample_for_every_solver(digits, vp, name, prediction):
    steps = 3 if name == "heun" else 5  # heun: 2·3 − 1 = 5 evaluations, repeated timesteps
    probe = DODEScheduler(solver=name)
    probe.set_timesteps(steps)
    solver = probe.solver
    lambdas = torch.linspace(0.05, 0.3, solver.num_stages, dtype=torch.float64)
    scheduler = DODEScheduler(solver=name, prediction_type=prediction, sigmas=solver.sigmas.tolist(), lambdas=lambdas.tolist(), nfe=solver.nfe, state_dtype="float64")
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == solver.nfe and scheduler.order == (2 if name == "heun" else 1)
    noise = unit_noise(4, seed=7)
    model = exact_model(digits, vp, prediction)
    x = noise * scheduler.init_noise_sigma  # what diffusers pipelines do
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    reference = solver.sample(DiscreteEpsDenoiser(exact_model(digits, vp, "epsilon"), vp), noise, lambdas)
    base = solver.sample(DiscreteEpsDenoiser(exact_model(digits, vp, "epsilon"), vp), noise)
    assert float((x - reference).abs().max()) < 1e-9
    assert float((reference - base).abs().max()) > 1e-3  # λ changed the result, so the check above can fail


# --- a calibrated scheduler: train.py → export-scheduler → pipeline = sample.py -----------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, folder):
    """D-DDIM NFE 4 fitted with train.py on the fixture (C = 2, |B| = 2), sampled by sample.py, exported by the CLI.

    The three commands run in-process (their `main` functions with the command's arguments) to spare CI three
    interpreter start-ups.
    """
    work = tmp_path_factory.mktemp("calibrated")
    config = ROOT / "configs" / "ddpm_cifar10.yaml"
    overrides = ["--model.denoiser", json.dumps({"source": "diffusers", "path": str(folder)}), "--model.nfe", "4"]
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    lambdas = work / "lambdas.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # LightningCLI saves its config.yaml into the working directory when there is no logger
        assert train_main([
            "--config", str(config), *overrides, "--data.scale", "2", "--data.batch_size", "2", "--data.seed", "100",
            "--data.cache_dir", str(work / "cache"), "--model.output", str(lambdas), *quiet,
        ]) == 0
        assert sample_main([
            "--config", str(config), *overrides, "--lambdas", str(lambdas), "--seeds", "0-1", "--outdir", str(work / "images"),
            "--eval-batch", "2", *quiet,
        ]) == 0
        assert sample_main(["export-scheduler", "--lambdas", str(lambdas), "--pipeline", str(folder), "--out", str(work / "scheduler")]) == 0
    return work


def test_calibrated_scheduler_reproduces_sample_py(calibrated, ddpm_pipe, ddpm_config):
    scheduler = DODEScheduler.from_pretrained(calibrated / "scheduler")
    lambdas, meta = load_lambdas(calibrated / "lambdas.safetensors")
    assert scheduler.config.lambdas == lambdas["lambdas"].double().tolist() and scheduler.calibrated_steps == 4
    assert scheduler.state_dtype == torch.float32 and meta["state_dtype"] == "float32"
    final = run_pipeline(ddpm_pipe, scheduler, 4)[-1]
    store = ImageStore(calibrated / "images")
    sampled = np.stack([np.asarray(Image.open(store.png_path(seed))).transpose(2, 0, 1) for seed in SEEDS])
    ours = to_uint8(final).numpy()
    mismatch = np.abs(ours.astype(int) - sampled.astype(int))
    print(f"\ncalibrated D-DDIM NFE 4 in DDPMPipeline vs sample.py PNGs: max |Δ| = {mismatch.max()} (uint8), {(mismatch > 0).mean():.1e} of values differ")
    assert mismatch.max() <= 1 and (mismatch > 0).mean() < 1e-3
    base = run_pipeline(ddpm_pipe, DODEScheduler.from_config(ddpm_config), 4)[-1]
    assert float((base - final).abs().max()) > 1e-2 * float(final.abs().max())  # the λ matter


def test_save_load_round_trip_gives_identical_outputs(calibrated, ddpm_pipe, folder, tmp_path):
    exported = export_scheduler(calibrated / "lambdas.safetensors", folder)
    exported.save_pretrained(tmp_path)
    loaded = DODEScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(exported.config)
    first, second = run_pipeline(ddpm_pipe, exported, 4), run_pipeline(ddpm_pipe, loaded, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))  # JSON only, never a pickle


def test_another_number_of_steps_is_refused(calibrated, ddpm_pipe):
    scheduler = DODEScheduler.from_pretrained(calibrated / "scheduler")
    with pytest.raises(SchedulerConfigError, match="num_inference_steps=4") as err:
        run_pipeline(ddpm_pipe, scheduler, 7)
    assert "\n" not in str(err.value)
    with pytest.raises(SchedulerConfigError, match="custom"):
        scheduler.set_timesteps(timesteps=[900, 600, 300, 0])


def test_guidance_scale_recorded_in_the_lambda_file_warns_at_another(calibrated, folder, tmp_path):
    tensors, meta = load_lambdas(calibrated / "lambdas.safetensors")
    guided = save_lambdas(tmp_path / "guided.safetensors", tensors, {**meta, "guidance_scale": 7.5})
    scheduler = export_scheduler(guided, folder)
    assert scheduler.config.guidance_scale == 7.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.check_guidance_scale(7.5)
    with pytest.warns(UserWarning, match="guidance_scale=7.5"):
        scheduler.guidance_callback(type("Pipe", (), {"guidance_scale": 3.0})(), 0, 999, {})


def test_export_keeps_the_lambda_layout(calibrated, folder, tmp_path):
    tensors, meta = load_lambdas(calibrated / "lambdas.safetensors")
    stages = len(tensors["lambdas"])
    layered = save_lambdas(tmp_path / "layered.safetensors", {**tensors, "lambdas": torch.full((stages, 2, 3), 0.01)}, {**meta, "history": 2, "lambda_groups": "channel"})
    scheduler = export_scheduler(layered, folder)
    assert (scheduler.config.history, scheduler.config.lambda_groups) == (2, "channel")
    assert torch.tensor(scheduler.config.lambdas).shape == (stages, 2, 3)


def test_export_refuses_a_stored_first_step(calibrated, folder, tmp_path):
    """A pipeline calls the network at every timestep, from x_T: a `first_step: mean` file cannot run there."""
    tensors, meta = load_lambdas(calibrated / "lambdas.safetensors")
    first = save_lambdas(tmp_path / "first.safetensors", {**tensors, "first_denoised": torch.zeros(3, 32, 32)}, {**meta, "first_step": "mean"})
    with pytest.raises(LambdaFileError, match=r"stored x̂₀ \(first_step: mean\), which a diffusers pipeline .* k-diffusion / ComfyUI sampler"):
        export_scheduler(first, folder)


def test_export_refuses_another_beta_table(calibrated, folder, tmp_path):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.012}))
    with pytest.raises(SchedulerConfigError, match="β table"):
        export_scheduler(calibrated / "lambdas.safetensors", tmp_path)


def test_cli_bad_input_is_one_line_and_creates_nothing(tmp_path, folder, capsys):
    out = tmp_path / "out"
    assert export_scheduler_main(["--lambdas", str(tmp_path / "missing.safetensors"), "--pipeline", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "train.py" in err
    assert not out.exists()
    edm = save_lambdas(tmp_path / "edm.safetensors", {"lambdas": torch.zeros(3), "sigmas": make_solver("heun", 3).sigmas}, {"solver": "heun", "nfe": 3, "schedule": 'EDM{"t_max": 80.0}'})
    for lambdas, pipeline, message in [(edm, folder, "discrete VP"), (edm, tmp_path, "discrete VP")]:
        assert export_scheduler_main(["--lambdas", str(lambdas), "--pipeline", str(pipeline), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


# --- a tampered scheduler_config.json is refused in one line ----------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    probe = DODEScheduler(solver="ddim")
    probe.set_timesteps(5)
    calibrated_on = describe_schedule(probe.schedule)
    DODEScheduler(solver="ddim", nfe=5, sigmas=probe.solver.sigmas.tolist(), lambdas=[0.1] * 5, schedule_id=calibrated_on).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lambdas": [0.1] * 4}, "has 5 stages"),
        ({"solver": "unknown_solver"}, "solver is"),
        ({"lambdas": [0.1, math.nan, 0.1, 0.1, 0.1]}, "a value in lambdas is nan"),
        ({"nfe": 6}, "nfe 6"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"sigmas": None}, "sigmas and nfe"),
        ({"sigmas": [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]}, "strictly descending"),
        ({"sigmas": "abc"}, "list of numbers"),
        ({"lambdas": [[0.1], "x"]}, "a value in lambdas"),
        ({"beta_end": 0.03}, "β table"),
        ({"lambda_groups": "rows"}, "lambda groups"),
    ],
)
def test_tampered_config_is_refused(saved, change, message):
    path = saved / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(SchedulerConfigError, match=message) as err:
        DODEScheduler.from_pretrained(saved)
    assert "\n" not in str(err.value)


# --- a tiny latent StableDiffusionPipeline with classifier-free guidance (init_noise_sigma, scale_model_input) --------

GUIDANCE = 5.0
PROMPT = "a red cat"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.pipelines import write_tiny_sd_pipeline

    folder = write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe, pipe.scheduler.config  # `run_sd` swaps the scheduler: keep the folder's own config


def run_sd(pipe, scheduler, steps: int, latents: torch.Tensor) -> list[torch.Tensor]:
    """The latents after every `step()` of a guided StableDiffusionPipeline run from the given unit-noise latents."""
    trajectory = recorded(pipe, scheduler)
    count = len(latents)
    pipe([PROMPT] * count, negative_prompt=[""] * count, guidance_scale=GUIDANCE, num_inference_steps=steps, latents=latents.clone(), output_type="latent")
    return trajectory


def test_zero_lambda_matches_ddim_scheduler_in_a_guided_sd_pipeline(tiny_sd):
    _, pipe, config = tiny_sd  # SD v1: scaled_linear β, steps_offset 1, set_alpha_to_one False
    reference = diffusers.DDIMScheduler.from_config(config, clip_sample=False)
    reference.set_timesteps(8)
    schedule = DODEScheduler.from_config(config).schedule
    # DDIM's grid with these settings: its timesteps, then the last step to ᾱ_0 (σ(t = 0) > 0).
    sigmas = schedule.sigma(torch.cat([reference.timesteps.double(), torch.zeros(1, dtype=torch.float64)])).tolist()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = run_sd(pipe, reference, 8, latents)
    ours = run_sd(pipe, DODEScheduler.from_config(config, sigmas=sigmas), 8, latents)
    diff = relative_difference(ours, theirs)
    print(f"\nStableDiffusionPipeline (guidance {GUIDANCE}): DDIMScheduler vs DODEScheduler ddim λ ≡ 0, 8 steps: max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-6


@pytest.mark.parametrize("name,spacing", [("HeunDiscreteScheduler", "leading"), ("HeunDiscreteScheduler", "trailing"), ("EulerDiscreteScheduler", "leading")])
def test_swap_idiom_in_a_guided_sd_pipeline_reproduces_the_replaced_scheduler(tiny_sd, name, spacing):
    """`pipe.scheduler = DODEScheduler.from_config(pipe.scheduler.config)`: the replaced scheduler's grid, start and
    method (Heun's VE latents and sqrt(σ₀² + 1) start; ours hands out VP latents, so the final latents are compared)."""
    _, pipe, config = tiny_sd
    replaced = getattr(diffusers, name).from_config(config, timestep_spacing=spacing)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    theirs = run_sd(pipe, replaced, 5, latents)[-1]
    swapped = DODEScheduler.from_config(replaced.config)
    ours = run_sd(pipe, swapped, 5, latents)[-1]
    diff = relative_difference([ours], [theirs])
    print(f"\nStableDiffusionPipeline (guidance {GUIDANCE}), {name} {spacing} vs swapped-in DODEScheduler ({swapped.config.solver}, λ ≡ 0), 5 steps: max |Δ| / max |x| = {diff:.1e}")
    assert diff < 2e-6


@pytest.mark.parametrize("solver,steps", [("heun", 4), ("dpm_solver_3", 6)])
def test_sd_pipeline_with_lambdas_equals_the_solver_on_the_guided_denoiser(tiny_sd, solver, steps):
    """Heun runs on VE-form states (init_noise_sigma ≠ 1, repeated timesteps); DPM-Solver-3 at fractional timesteps."""
    folder, pipe, config = tiny_sd
    probe = DODEScheduler.from_config(config, solver=solver, base_scheduler=None)  # the package's grid
    probe.set_timesteps(steps)
    base_solver = probe.solver
    lambdas = torch.linspace(-0.2, 0.3, base_solver.num_stages, dtype=torch.float64)
    scheduler = DODEScheduler.from_config(
        config, solver=solver, nfe=base_solver.nfe, sigmas=base_solver.sigmas.tolist(), lambdas=lambdas.tolist(), state_dtype="float64"
    )
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = run_sd(pipe, scheduler, steps, latents)
    loaded = load_denoiser("diffusers_pipeline", folder, prompts=[PROMPT], guidance_scale=GUIDANCE)
    labels = torch.ones(2, 1, dtype=torch.float64)  # every sample: prompt 0
    with torch.no_grad():
        final = base_solver.sample(loaded.denoiser, latents.double(), lambdas, labels)
        base = base_solver.sample(loaded.denoiser, latents.double(), None, labels)
    diff = relative_difference(ours[-1:], [final])
    print(f"\nStableDiffusionPipeline (guidance {GUIDANCE}), D-{solver} {steps} steps, init_noise_sigma {scheduler.init_noise_sigma:.6f}: max |Δ| / max |x| vs the solver = {diff:.1e}")
    assert len(ours) == base_solver.nfe and diff < 1e-5
    assert relative_difference([base], [final]) > 1e-3  # λ changed the result


def test_guidance_callback_warns_inside_the_sd_pipeline(tiny_sd):
    _, pipe, config = tiny_sd
    scheduler = DODEScheduler.from_config(config, guidance_scale=7.5)
    pipe.scheduler = scheduler
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="fitted at guidance_scale=7.5; at 5.0"):
        pipe(PROMPT, guidance_scale=GUIDANCE, num_inference_steps=2, latents=latents, output_type="latent",
             callback_on_step_end=scheduler.guidance_callback)


@pytest.mark.parametrize("history,groups", [(2, "none"), (1, "channel"), (3, "blocks:2")])
def test_lambda_layouts_run_as_sample_py_applies_them(digits, vp, history, groups):
    """History-m and per-group λ (compact (K, m, G) in the config) expand to the latents' shape at the first step."""
    probe = DODEScheduler(solver="dpm_solver_pp_3m")
    probe.set_timesteps(6)
    solver = probe.solver
    layout = LambdaLayout(history, groups)
    shape = layout.shape(solver.num_stages, (1, 8, 8))
    compact = 0.1 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = DODEScheduler(
        solver="dpm_solver_pp_3m", nfe=solver.nfe, sigmas=solver.sigmas.tolist(), lambdas=compact.tolist(), history=history, lambda_groups=groups,
        state_dtype="float64",
    )
    scheduler.set_timesteps(6)
    noise = unit_noise(3, seed=8)
    model = exact_model(digits, vp, "epsilon")
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    reference = solver.sample(DiscreteEpsDenoiser(model, vp), noise, layout.expand(compact, (1, 8, 8)))
    assert float((x - reference).abs().max()) < 1e-9
    assert float((reference - solver.sample(DiscreteEpsDenoiser(model, vp), noise)).abs().max()) > 1e-3
    if groups != "none":  # per-group λ belong to one channel count
        scheduler.set_timesteps(6)
        other = torch.zeros(3, 2, 8, 8, dtype=torch.float64)
        with pytest.raises(SchedulerConfigError, match="latents of another shape"):
            scheduler.step(other, scheduler.timesteps[0], other)


def test_calibrated_scheduler_in_the_sd_pipeline_reproduces_sample_py(tiny_sd, tmp_path):
    """train.py on the guided latent pipeline → export-scheduler → StableDiffusionPipeline with one generator and the
    drawn prompt per seed gives sample.py's decoded images."""
    folder, pipe, sd_config = tiny_sd
    prompts = ["a red cat", "a blue dog", "an old boat"]
    config = tmp_path / "sd.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "model": {"denoiser": {"source": "diffusers_pipeline", "path": str(folder), "prompts": prompts, "guidance_scale": GUIDANCE},
                  "solver": "ddim", "nfe": 4, "state_dtype": "float32", "output": str(tmp_path / "lambdas.safetensors")},
        "data": {"scale": 2, "batch_size": 3, "seed": 50, "cache_dir": str(tmp_path / "cache")},
    }))
    seeds = [0, 1, 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert train_main(["--config", str(config)]) == 0
        assert sample_main(["--config", str(config), "--lambdas", str(tmp_path / "lambdas.safetensors"), "--seeds", "0-2",
                            "--outdir", str(tmp_path / "images"), "--eval-batch", "3"]) == 0
        assert sample_main(["export-scheduler", "--lambdas", str(tmp_path / "lambdas.safetensors"), "--pipeline", str(folder),
                            "--out", str(tmp_path / "scheduler")]) == 0
    scheduler = DODEScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.guidance_scale == GUIDANCE and scheduler.calibrated_steps == 4
    _, onehot = seeded_noise(seeds, (4, 8, 8), len(prompts))  # each seed's latents, then its prompt
    drawn = [prompts[i] for i in onehot.argmax(-1).tolist()]

    def pipeline_images(scheduler: DODEScheduler) -> np.ndarray:
        pipe.scheduler = scheduler
        images = pipe(drawn, negative_prompt=[""] * len(seeds), guidance_scale=GUIDANCE, num_inference_steps=4,
                      generator=[torch.Generator().manual_seed(seed) for seed in seeds], output_type="pil").images
        return np.stack([np.asarray(image) for image in images]).astype(int)

    store = ImageStore(tmp_path / "images")
    sampled = np.stack([np.asarray(Image.open(store.png_path(seed))) for seed in seeds]).astype(int)
    mismatch = np.abs(pipeline_images(scheduler) - sampled)
    assert np.abs(pipeline_images(DODEScheduler.from_config(sd_config)) - sampled).max() > 1  # the λ matter
    print(f"\ncalibrated D-DDIM NFE 4 in StableDiffusionPipeline (guidance {GUIDANCE}) vs sample.py PNGs: max |Δ| = {mismatch.max()} (uint8), {(mismatch > 0).mean():.1e} of values differ")
    assert mismatch.max() <= 1 and (mismatch > 0).mean() < 0.01
