"""`dode_lightning.k_diffusion` (issue 19 item 2): k-diffusion's sampler contract, equal at λ ≡ 0 to k-diffusion's
Euler, Heun and DPM-Solver++(2M) (an independent transcription here, and the installed k-diffusion file if present),
and a λ file's calibrated D-solver with its σ list."""
import importlib.metadata
import math
import sys
import types

import pytest
import torch

from dode_lightning.distill import SolverSetup
from dode_lightning.k_diffusion import sample_dode, sampler_from_lambda_file
from dode_lightning.lambda_file import LambdaFileError, save_lambdas, schedule_id
from dode_lightning.schedules import EDM, make_schedule
from dode_lightning.solvers import SOLVERS
from tests.conftest import unit_noise


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5 in float32, then σ = 0 (k-diffusion's convention)."""
    ramp = torch.linspace(0, 1, steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --- the transcription: Karras et al. Algorithm 2 (S_churn = 0) and DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) ------


def ref_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        slope = (x - model(x, sigmas[i] * x.new_ones(len(x)))) / sigmas[i]
        x = x + slope * (sigmas[i + 1] - sigmas[i])
    return x


def ref_heun(model, x, sigmas):
    ones = x.new_ones(len(x))
    for i in range(len(sigmas) - 1):
        slope = (x - model(x, sigmas[i] * ones)) / sigmas[i]
        step = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + slope * step
            continue
        guess = x + slope * step
        slope_next = (guess - model(guess, sigmas[i + 1] * ones)) / sigmas[i + 1]
        x = x + (slope + slope_next) / 2 * step
    return x


def ref_dpmpp_2m(model, x, sigmas):
    ones, previous = x.new_ones(len(x)), None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones)
        ell, ell_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = ell_next - ell
        estimate = denoised
        if previous is not None and sigmas[i + 1] != 0:
            r = (ell - (-sigmas[i - 1].log())) / h
            estimate = (1 + 1 / (2 * r)) * denoised - previous / (2 * r)
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        previous = denoised
    return x


REFERENCES = {"euler": ref_euler, "heun": ref_heun, "dpm_solver_pp_2m": ref_dpmpp_2m}


def _installed_k_diffusion():
    """k-diffusion's own sampling.py from the installed distribution (`pip install --no-deps k-diffusion`), loaded
    without its package __init__ (which needs torchvision, scikit-image, wandb, …): its unused SDE/ODE imports are
    stubbed, `utils.append_dims` is the one helper the three samplers use."""
    try:
        source = importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion/sampling.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    stubs = {"torchdiffeq": types.ModuleType("torchdiffeq"), "torchsde": types.ModuleType("torchsde")}
    stubs["torchdiffeq"].odeint = None
    package, utils = types.ModuleType("_kdiff"), types.ModuleType("_kdiff.utils")
    package.__path__ = []
    utils.append_dims = lambda t, dims: t[(...,) + (None,) * (dims - t.ndim)]
    package.utils = utils
    module = types.ModuleType("_kdiff.sampling")
    module.__package__ = "_kdiff"
    saved = {name: sys.modules.get(name) for name in [*stubs, "_kdiff", "_kdiff.utils"]}
    sys.modules.update({**{k: v for k, v in stubs.items() if k not in sys.modules or sys.modules[k] is None}, "_kdiff": package, "_kdiff.utils": utils})
    try:
        exec(compile(open(source).read(), str(source), "exec"), module.__dict__)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    return {"euler": module.sample_euler, "heun": module.sample_heun, "dpm_solver_pp_2m": module.sample_dpmpp_2m}


def _model(digits):
    return lambda x, sigma: digits(x, sigma).to(x.dtype)


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    diff = float((ours - theirs).abs().max())
    return diff, diff / float(theirs.abs().max())


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_zero_lambda_equals_the_transcription(digits, name):
    sigmas = karras_sigmas(8)
    x = unit_noise(4).float() * sigmas[0]
    ours = sample_dode(_model(digits), x, sigmas, solver=name, disable=True)
    theirs = REFERENCES[name](_model(digits), x, sigmas)
    zero = sample_dode(_model(digits), x, sigmas, solver=name, disable=True, lambdas=torch.zeros(SOLVERS[name](sigmas.double()).num_stages))
    absolute, relative = _difference(ours, theirs)
    print(f"\n{name} λ ≡ 0 vs the transcription (float32, 8 Karras steps): max |Δ| = {absolute:.1e}, relative {relative:.1e}")
    assert relative < 1e-5 and torch.equal(zero, ours)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_zero_lambda_equals_installed_k_diffusion(digits, name):
    theirs_fn = _installed_k_diffusion()[name]
    sigmas = karras_sigmas(8)
    x = unit_noise(4).float() * sigmas[0]
    seen = []
    ours = sample_dode(_model(digits), x, sigmas, solver=name, disable=True, callback=seen.append)
    expected = []
    theirs = theirs_fn(_model(digits), x, sigmas, disable=True, callback=expected.append)
    absolute, relative = _difference(ours, theirs)
    print(f"\n{name} λ ≡ 0 vs k-diffusion 0.1.1.post1 (float32, 8 Karras steps): max |Δ| = {absolute:.1e}, relative {relative:.1e}")
    assert relative < 1e-5
    assert [c["i"] for c in seen] == [c["i"] for c in expected] == list(range(len(sigmas) - 1))
    for mine, reference in zip(seen, expected):
        assert set(mine) == set(reference) and float(mine["sigma"]) == float(reference["sigma"]) == float(mine["sigma_hat"])
        assert torch.allclose(mine["x"], reference["x"], rtol=1e-4, atol=1e-4 * float(sigmas[0]))


def test_lambdas_run_the_d_solver_as_solver_sample(digits):
    """With λ the k-diffusion path is the package's own D-solver (float64, VE form)."""
    solver = SolverSetup.resolve("dpm_solver_pp_2m", 6, EDM()).build()
    solver = type(solver)(solver.sigmas, lower_order_final_below=0)
    lambdas = torch.linspace(-0.2, 0.4, solver.num_stages, dtype=torch.float64)
    noise = unit_noise(3)
    ours = sample_dode(digits, noise * solver.sigmas[0], solver.sigmas, solver="dpm_solver_pp_2m", lambdas=lambdas, disable=True)
    assert torch.equal(ours, solver.sample(digits, noise, lambdas))


def _lambda_file(tmp_path, name, nfe, schedule, **meta):
    solver = SolverSetup.resolve(name, nfe, schedule).build()
    lambdas = torch.linspace(0.1, 0.3, solver.num_stages, dtype=torch.float64) * torch.tensor(solver.lambda_fitted)
    tensors = {"lambdas": lambdas, "sigmas": solver.sigmas, "target_sigmas": solver.target_sigmas}
    metadata = {"solver": name, "nfe": solver.nfe, "schedule": schedule_id(schedule), "grid": "karras", "history": 1, "lambda_groups": "none", **meta}
    return save_lambdas(tmp_path / f"{name}.safetensors", tensors, metadata), solver, lambdas


@pytest.mark.parametrize("name,schedule", [("heun", "edm"), ("ddim", "vp_linear"), ("dpm_solver_2", "vp_linear"), ("unipc_3", "edm")])
def test_lambda_file_sampler_reproduces_solver_sample(tmp_path, digits, name, schedule):
    schedule = make_schedule(schedule)
    path, solver, lambdas = _lambda_file(tmp_path, name, 5, schedule)
    sample, sigmas = sampler_from_lambda_file(path)
    assert float(sigmas[-1]) == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    noise = unit_noise(3)
    start = solver.init_state(noise) / solver.scales[0]  # the VE state the solver starts from
    ours = sample(digits, start, sigmas.float().double(), disable=True)
    expected = solver.sample(digits, noise, lambdas) / solver.scales[-1]
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fitted on the sigmas"):
        sample(digits, start, sigmas * 0.9)


def test_lambda_file_without_integer_timesteps_is_refused_for_discrete_models(tmp_path):
    path, _, _ = _lambda_file(tmp_path, "ddim", 4, make_schedule("vp_linear"), integer_timesteps=False)
    sampler_from_lambda_file(path)
    with pytest.raises(LambdaFileError, match="integer_timesteps"):
        sampler_from_lambda_file(path, require_integer_timesteps=True)
    ok, _, _ = _lambda_file(tmp_path, "euler", 4, make_schedule("vp_linear"), integer_timesteps=True)
    sampler_from_lambda_file(ok, require_integer_timesteps=True)
    edm, _, _ = _lambda_file(tmp_path, "heun", 5, EDM())
    sampler_from_lambda_file(edm, require_integer_timesteps=True)  # continuous σ: nothing to round
    assert math.isfinite(float(sampler_from_lambda_file(edm)[1][0]))
