"""Flow matching: the shifted time grids against diffusers, the exact flow model, λ files that record the shift."""
import math

import numpy as np
import pytest
import torch

from dode_lightning.checkpoints import load_denoiser
from dode_lightning.gmm import GaussianMixture
from dode_lightning.grids import check_flow_times, flow_times, make_sigmas
from dode_lightning.lambda_file import LambdaFileError
from dode_lightning.schedules import EDM, FlowMatching, dynamic_shift_mu, flow_time_shift
from dode_lightning.solvers import SOLVERS, make_solver
from tests.conftest import unit_noise


@pytest.mark.parametrize("shift", [1.0, 3.0, 2.5])
@pytest.mark.parametrize("steps", [1, 4, 8, 28])
def test_static_shift_grids_are_diffusers_to_the_bit(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    assert torch.equal(flow_times(FlowMatching(shift), steps), reference.sigmas[:-1].double())
    flux = FlowMatchEulerDiscreteScheduler(shift=shift)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # FluxPipeline's own spacing
    assert torch.equal(flow_times(FlowMatching(shift), steps, "flux"), flux.sigmas[:-1].double())


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shift_grids_are_diffusers_to_the_bit(time_shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = dynamic_shift_mu(1024)
    assert mu == pytest.approx(calculate_shift(1024))
    schedule = FlowMatching(mu=mu, time_shift_type=time_shift_type)
    for grid, sigmas in (("flow", None), ("flux", np.linspace(1.0, 1 / 6, 6))):
        reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type)
        reference.set_timesteps(6, mu=mu) if sigmas is None else reference.set_timesteps(sigmas=sigmas, mu=mu)
        assert torch.equal(flow_times(schedule, 6, grid), reference.sigmas[:-1].double())


def test_exponential_shift_of_log_shift_is_the_static_shift():
    t = torch.linspace(1, 0.01, 50, dtype=torch.float64)
    torch.testing.assert_close(flow_time_shift(t, mu=math.log(3.0)), flow_time_shift(t, 3.0), rtol=1e-14, atol=0)


def test_flow_schedule_starts_at_infinite_sigma_with_finite_scales():
    schedule = FlowMatching(3.0)
    sigmas = make_sigmas("flow", 8, schedule)
    assert math.isinf(float(sigmas[0])) and float(sigmas[-1]) == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert float(schedule.scale(sigmas[0])) == 0 and float(schedule.noise_scale(sigmas[0])) == 1
    t = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    sigma = schedule.sigma(t)
    torch.testing.assert_close(schedule.sigma_inv(sigma), t)
    torch.testing.assert_close(schedule.scale(sigma), 1 - t)
    torch.testing.assert_close(schedule.noise_scale(sigma), t)
    with pytest.raises(ValueError, match="flow schedule"):
        make_sigmas("flow", 8, EDM())


@pytest.mark.parametrize("shift", [0, -1.0, 100.5, float("nan"), True, "3"])
def test_shift_outside_range_is_refused(shift):
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        FlowMatching(shift)


def test_flow_time_grid_checks():
    check_flow_times(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="start at t = 1"):
        check_flow_times(torch.tensor([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError, match="descending"):
        check_flow_times(torch.tensor([1.0, 0.5, 0.6, 0.0]))


def test_exact_velocity_is_finite_at_t1_and_matches_the_ve_posterior(digits):
    noise = unit_noise(6, seed=11)
    data_mean = (digits.log_weights.exp()[:, None] * digits.means).sum(0).reshape(1, 8, 8)
    v1 = digits.velocity(noise, 1.0)
    torch.testing.assert_close(v1, noise - data_mean, atol=1e-12, rtol=0)
    t = 0.3
    x_t = (1 - t) * digits.sample(6, torch.Generator().manual_seed(12)) + t * noise
    torch.testing.assert_close(x_t - t * digits.velocity(x_t, t), digits(x_t / (1 - t), t / (1 - t)), atol=1e-12, rtol=0)
    per_sample = torch.full((6,), t, dtype=torch.float64)
    torch.testing.assert_close(digits.velocity(x_t, per_sample), digits.velocity(x_t, t))


def test_flow_endpoint_integrator_matches_the_closed_form(digits):
    # Two identical components: one Gaussian's ODE, but the integrator path is taken.
    single = GaussianMixture(digits.means[[4]], digits.covariances[[4]], shape=(1, 8, 8))
    twin = GaussianMixture(digits.means[[4, 4]], digits.covariances[[4, 4]], shape=(1, 8, 8))
    noise = unit_noise(4, seed=13)
    closed = single.flow_endpoint(noise)
    # Closed form from t = 1: x₀ = μ + U diag(√s) Uᵀ ε, a sample of N(μ, Σ) (method.md §9.4).
    sqrt_cov = single.eigvecs[0] @ torch.diag(single.eigvals[0].sqrt()) @ single.eigvecs[0].T
    manual = digits.means[4] + noise.reshape(4, -1) @ sqrt_cov.T
    torch.testing.assert_close(closed.reshape(4, -1), manual, atol=1e-10, rtol=0)
    integrated = twin.flow_endpoint(noise)
    assert (integrated - closed).norm() / closed.norm() < 1e-6


def test_gmm_digits_flow_source_records_the_shift():
    loaded = load_denoiser("gmm_digits_flow", shift=3.0)
    assert isinstance(loaded.schedule, FlowMatching) and loaded.schedule.shift == 3.0
    assert loaded.conditioning == {"time_shift": {"shift": 3.0}}
    x_t = unit_noise(3, seed=14) * 0.6
    sigma = torch.tensor(0.4 / 0.6, dtype=torch.float64)
    eps, denoised = loaded.denoiser.eps_and_denoised(x_t / 0.6, sigma)
    v = loaded.denoiser.velocity_model(x_t, torch.full((3,), 0.4, dtype=torch.float64), None)
    torch.testing.assert_close(denoised, x_t - 0.4 * v)
    torch.testing.assert_close(eps, x_t + 0.6 * v)
    eps1, denoised1 = loaded.denoiser.flow_eps_and_denoised(unit_noise(3, seed=15), 1.0)
    assert eps1.isfinite().all() and denoised1.isfinite().all()
    with pytest.raises(ValueError, match="either a static shift"):
        load_denoiser("gmm_digits_flow", shift=3.0, mu=0.8)


SOLVER_NFES = {"heun": (9, 65)}  # odd NFE (2N − 1)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_runs_from_t1_and_converges_to_the_exact_endpoint(name):
    loaded = load_denoiser("gmm_digits_flow", shift=3.0)
    labels = torch.arange(6) % 10  # one component each: the exact endpoint is the closed form
    noise = unit_noise(6, seed=21)
    exact = loaded.denoiser.exact_endpoint(noise, math.inf, labels)
    if name.startswith("dpm_solver_") and not name.startswith("dpm_solver_pp"):
        with pytest.raises(ValueError, match="cannot start at σ = ∞"):
            make_solver(name, 8, loaded.schedule)
        return
    errors = []
    for nfe in SOLVER_NFES.get(name, (8, 64)):
        solver = make_solver(name, nfe, loaded.schedule)
        assert math.isinf(float(solver.sigmas[0])) and float(solver.noise_scales[0]) == 1
        assert not solver.lambda_fitted[0]  # no Δ_0 from σ = ∞
        x = solver.sample(loaded.denoiser, noise, None, labels)
        errors.append(float((x - exact).norm() / exact.norm()))
    assert all(math.isfinite(e) for e in errors), errors
    assert errors[1] < 0.45 * errors[0] and errors[1] < 0.05, errors


@pytest.mark.parametrize("name, reference", [("euler", "FlowMatchEulerDiscreteScheduler"), ("heun", "FlowMatchHeunDiscreteScheduler")])
def test_euler_and_heun_are_diffusers_flow_schedulers(name, reference):
    """Heun's flow form (trapezoid in t on x_t) is diffusers' FlowMatchHeunDiscreteScheduler; Euler is FlowMatchEuler."""
    import diffusers

    loaded = load_denoiser("gmm_digits_flow", shift=3.0)
    steps, noise = 6, unit_noise(4, seed=22)
    scheduler = getattr(diffusers, reference)(shift=3.0)
    scheduler.set_timesteps(steps)
    x = noise.float()
    for timestep in scheduler.timesteps:
        t = torch.full((4,), float(timestep) / 1000, dtype=torch.float64)
        x = scheduler.step(loaded.denoiser.velocity_model(x.double(), t, None).float(), timestep, x).prev_sample
    solver = make_solver(name, steps if name == "euler" else 2 * steps - 1, loaded.schedule)
    ours = solver.sample(loaded.denoiser, noise)
    assert float((ours - x.double()).norm() / x.norm()) < 1e-5


def test_flow_lambda_file_refuses_another_shift_and_another_model(tmp_path):
    from dode_lightning.lambda_file import load_lambdas, save_lambdas
    from dode_lightning.lightning import build_student

    fitted = build_student({"source": "gmm_digits_flow", "shift": 3.0}, "euler", 8)
    path = save_lambdas(tmp_path / "lambdas.safetensors", {"lambdas": torch.zeros(8, dtype=torch.float64), "sigmas": fitted.solver.sigmas}, fitted.metadata())
    load_lambdas(path, expect=fitted.metadata())
    other = build_student({"source": "gmm_digits_flow", "shift": 2.5}, "euler", 8)
    with pytest.raises(LambdaFileError, match=r"time_shift=\{'shift': 3.0\} \(this run: \{'shift': 2.5\}\)"):
        load_lambdas(path, expect=other.metadata())
    edm = build_student({"source": "gmm_digits"}, "euler", 8)
    with pytest.raises(LambdaFileError, match="schedule="):
        load_lambdas(path, expect=edm.metadata())


def _run(tmp_path, script, *args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / script), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)


def _calibrate_flow_config(tmp_path, *extra):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "gmm_digits_flow.yaml"
    result = _run(
        tmp_path, "train.py", "--config", str(config), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--data.cache_dir", str(tmp_path / "cache"), "--model.output", str(tmp_path / "l.safetensors"), *extra,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return config, result


def test_flow_config_calibrates_and_its_lambda_file_refuses_another_shift(tmp_path):
    from dode_lightning.lambda_file import load_lambdas

    config, _ = _calibrate_flow_config(tmp_path, "--data.batch_size", "8", "--exact_report", "false")
    tensors, meta = load_lambdas(tmp_path / "l.safetensors")
    assert meta["time_shift"] == {"shift": 3.0} and meta["grid"] == "flow" and meta["solver"] == "euler"
    assert float(tensors["lambdas"][0]) == 0 and tensors["lambdas"].isfinite().all()
    shifted = tmp_path / "shift25.yaml"
    shifted.write_text(config.read_text().replace("shift: 3.0", "shift: 2.5"))
    result = _run(tmp_path, "sample.py", "--config", str(shifted), "--lambdas", str(tmp_path / "l.safetensors"), "--seeds", "0-3", "--outdir", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ") and "time_shift" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_flow_config_prints_the_exact_endpoint_table(tmp_path):
    _, result = _calibrate_flow_config(tmp_path)
    assert "RMSE to the exact probability-flow ODE endpoint" in result.stdout
    held_out = next(line for line in result.stdout.splitlines() if line.startswith("| held-out"))
    base, d_ode = (float(cell.split()[0]) for cell in held_out.split("|")[2:4])
    assert d_ode < 0.8 * base


@pytest.mark.parametrize("name, nfe", [("euler", 6), ("heun", 7)])
def test_k_diffusion_sampler_runs_flow_lambda_files_in_comfyuis_flow_convention(tmp_path, name, nfe):
    """ComfyUI's flow models: the k-diffusion σ is t, x is x_t, the model returns x_t − t·v. At λ ≡ 0 the calibrated
    sampler is k-diffusion's Euler / Heun on that σ list; with λ it is `Solver.sample` of the λ file's D-solver."""
    from dode_lightning.k_diffusion import sampler_from_lambda_file
    from dode_lightning.lambda_file import save_lambdas
    from dode_lightning.lightning import build_student
    from tests.test_k_diffusion import ref_euler, ref_heun

    built = build_student({"source": "gmm_digits_flow", "shift": 3.0}, name, nfe)
    velocity = built.loaded.denoiser.velocity_model

    def model(x_t, t):  # a ComfyUI CONST model: denoised = x_t − t·v
        return x_t - t.reshape(-1, 1, 1, 1) * velocity(x_t, t, None)

    noise = unit_noise(4, seed=23)
    for lambdas in (torch.zeros(built.solver.num_stages, dtype=torch.float64), torch.linspace(0.0, 0.5, built.solver.num_stages, dtype=torch.float64)):
        path = save_lambdas(tmp_path / f"{name}.safetensors", {"lambdas": lambdas, "sigmas": built.solver.sigmas}, built.metadata())
        sample, times = sampler_from_lambda_file(path)
        assert float(times[0]) == 1.0 and float(times[-1]) == 0.0 and bool((times[:-1] > times[1:]).all())
        ours = sample(model, noise * times[0], times, disable=True)
        expected = built.solver.sample(built.loaded.denoiser, noise, lambdas)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
        if not lambdas.any():
            reference = (ref_euler if name == "euler" else ref_heun)(model, noise * times[0], times)
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_joint_fit_spreads_flow_grids_in_flow_time():
    from dode_lightning.distill import build_teacher
    from dode_lightning.joint_fit import TeacherPath, grid_from_params, step_params
    from dode_lightning.lightning import build_student

    built = build_student({"source": "gmm_digits_flow", "shift": 3.0}, "euler", 6)
    sigmas = built.solver.sigmas
    with pytest.raises(ValueError, match="joint_coordinate flow"):
        step_params(sigmas, "log")
    theta = step_params(sigmas, "flow")
    torch.testing.assert_close(grid_from_params(theta, sigmas, "flow"), sigmas, rtol=1e-12, atol=0)
    moved = grid_from_params(theta + torch.linspace(-0.3, 0.3, len(theta), dtype=torch.float64), sigmas, "flow")
    assert math.isinf(float(moved[0])) and float(moved[-1]) == 0 and bool((moved[:-1] > moved[1:]).all())
    path = TeacherPath(sigmas, torch.stack([torch.full((1,), float(k)) for k in range(len(sigmas))]))
    between = built.loaded.schedule.sigma(torch.tensor(0.5 * (1 + float(built.loaded.schedule.sigma_inv(sigmas[1]))), dtype=torch.float64))
    assert float(path.at(between)) == pytest.approx(0.5)  # linear in flow time between t = 1 and t_1
    learned = built.setup.on(moved, "joint", start_grid="flow", coordinate="flow")
    teacher, _ = build_teacher(learned.build(), learned, 4)
    assert bool(teacher.sigmas[1:].isfinite().all()) and bool(teacher.noise_scales.isfinite().all())


@pytest.mark.slow
def test_flow_config_joint_fit(tmp_path):
    from dode_lightning.lambda_file import load_lambdas

    _, result = _calibrate_flow_config(tmp_path, "--model.fit", "joint", "--model.joint_coordinate", "flow")
    tensors, meta = load_lambdas(tmp_path / "l.safetensors")
    assert meta["grid"] == "joint" and math.isinf(float(tensors["sigmas"][0]))
    held_out = next(line for line in result.stdout.splitlines() if line.startswith("| held-out"))
    base, d_ode = (float(cell.split()[0]) for cell in held_out.split("|")[2:4])
    assert d_ode < 0.5 * base
