import math

import numpy as np
import pytest
import torch

from dode_lightning.denoisers import CountingDenoiser
from dode_lightning.grids import karras_sigmas
from dode_lightning.schedules import make_schedule
from dode_lightning.solvers import NFEError, Heun, make_solver, run_stages
from tests.conftest import fixture_path, unit_noise

LABELS = torch.arange(40) % 10


def _states(solver, denoiser, noise, lambdas=None, labels=None):
    states = []
    solver.sample(denoiser, noise, lambdas, labels, observe=lambda k, stage, x: states.append(x.clone()))
    return states


@pytest.mark.parametrize("name,nfe,schedule", [("ddim", 6, "vp_linear"), ("ddim", 5, "edm"), ("euler", 6, "edm"), ("heun", 7, "edm")])
def test_zero_lambda_is_the_base_solver_bit_for_bit(digits, name, nfe, schedule):
    solver = make_solver(name, nfe, make_schedule(schedule))
    noise = unit_noise(6)
    base = solver.sample(digits, noise)
    zero = solver.sample(digits, noise, torch.zeros(solver.num_stages, dtype=torch.float64))
    assert torch.equal(base, zero)
    assert torch.equal(solver.sample(digits, noise.float(), torch.zeros(solver.num_stages)), solver.sample(digits, noise.float()))


@pytest.mark.parametrize("name,nfe", [("ddim", 6), ("euler", 6), ("heun", 7)])
def test_nonzero_lambda_changes_exactly_the_stages_from_k_on(digits, name, nfe):
    solver = make_solver(name, nfe)
    noise = unit_noise(4)
    base = _states(solver, digits, noise)
    fitted = [k for k, free in enumerate(solver.lambda_fitted) if free]
    for k in fitted[:: max(1, len(fitted) // 3)]:
        lambdas = torch.zeros(solver.num_stages, dtype=torch.float64)
        lambdas[k] = 0.3
        states = _states(solver, digits, noise, lambdas)
        assert all(torch.equal(a, b) for a, b in zip(states[:k], base[:k]))
        assert all(not torch.equal(a, b) for a, b in zip(states[k:], base[k:]))
    # A λ where Δ is structurally absent has no effect at all.
    for k, free in enumerate(solver.lambda_fitted):
        if not free:
            lambdas = torch.zeros(solver.num_stages, dtype=torch.float64)
            lambdas[k] = 5.0
            assert torch.equal(solver.sample(digits, noise, lambdas), solver.sample(digits, noise))


def test_stage_update_is_base_plus_lambda_delta(digits):
    solver = make_solver("heun", 5)
    lambdas = torch.linspace(0.1, 0.5, solver.num_stages, dtype=torch.float64)
    seen = []
    solver.sample(digits, unit_noise(3), lambdas, observe=lambda k, stage, x: seen.append((k, stage, x)))
    for k, stage, x in seen:
        expected = stage.base if stage.delta is None else stage.base + lambdas[k] * stage.delta
        assert torch.equal(x, expected)
    assert [s.sigma_next for _, s, _ in seen] == solver.target_sigmas.tolist()


def test_noise_and_data_ddim_share_the_base_update_and_differ_in_delta(digits):
    schedule = make_schedule("vp_linear")
    noise = unit_noise(4)
    eps_solver, x0_solver = make_solver("ddim", 8, schedule), make_solver("euler", 8, schedule)
    assert torch.equal(eps_solver.sample(digits, noise), x0_solver.sample(digits, noise))
    assert eps_solver.lambda_fitted[0] and not x0_solver.lambda_fitted[0]


def test_noise_ddim_matches_the_official_alpha_form(digits):
    """x_{t−1} = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε with ε from an ε-network, on the official uniform_torch grid."""
    schedule = make_schedule("vp_linear")
    abar = torch.cat([schedule.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # index −1 → ᾱ = 1
    timesteps = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    x = unit_noise(5)
    ours = make_solver("ddim", 10, schedule).sample(digits, x)
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        a, a_prev = abar[t], abar[t_prev]
        sigma = math.sqrt((1 - a) / a)
        eps = (x / a.sqrt() - digits(x / a.sqrt(), sigma)) / sigma
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


def test_official_b_coefficients():
    """method.md §3.1 and §3.6/3.7 list b for N = 10 (noise DDIM), N = 10 (EDM DDIM), N = 5 (Heun p, c)."""
    b_noise = [s.coeff for s in _stage_list(make_solver("ddim", 10, make_schedule("vp_linear")))]
    assert b_noise == pytest.approx([-1.362, -1.136, -0.936, -0.762, -0.617, -0.503, -0.419, -0.361, -0.332, -0.010], abs=1e-3)
    b_data = [s.coeff for s in _stage_list(make_solver("euler", 10))]
    assert b_data == pytest.approx([0.470, 0.502, 0.539, 0.582, 0.631, 0.687, 0.752, 0.825, 0.902, 1.0], abs=1e-3)
    heun = [s.coeff for s in _stage_list(make_solver("heun", 9))]
    assert heun[0::2] == pytest.approx([0.781, 0.857, 0.933, 0.988, 1.0], abs=1e-3)
    assert heun[1::2] == pytest.approx([1.78, 2.98, 6.91, 41.9], rel=2e-3)


def _stage_list(solver):
    stages = []
    denoiser = lambda x, sigma, labels=None: torch.zeros_like(x)  # noqa: E731
    run_stages(solver.stages(solver.init_state(torch.zeros(1, 1, 2, 2))), denoiser, observe=lambda k, s, x: stages.append(s))
    return stages


@pytest.mark.parametrize(
    "name,nfes,schedule,order",
    [
        ("euler", [8, 16, 32, 64], "edm", 1.0),
        ("ddim", [8, 16, 32, 64], "edm", 1.0),
        ("heun", [15, 31, 63, 127], "edm", 2.0),
    ],
)
def test_convergence_order_against_the_exact_endpoint(digits, name, nfes, schedule, order):
    noise = unit_noise(len(LABELS), seed=11)
    errors = []
    for nfe in nfes:
        solver = make_solver(name, nfe, make_schedule(schedule))
        x = solver.sample(digits, noise, class_labels=LABELS)
        exact = digits.exact_endpoint(solver.init_state(noise) / float(solver.scales[0]), float(solver.sigmas[0]), LABELS)
        errors.append(float((x - exact).pow(2).mean().sqrt()))
    # Fit the three finest points: the asymptotic regime (Heun's coarsest point is still pre-asymptotic).
    slope = -np.polyfit(np.log(nfes[1:]), np.log(errors[1:]), 1)[0]
    print(f"{name}: NFE {nfes} RMSE {errors} slope {slope:.3f}")
    assert abs(slope - order) < 0.15, (slope, errors)


def test_noise_ddim_converges_to_the_exact_vp_endpoint(digits):
    """VP discrete: the grid starts at a different t for each N, so compare each run with its own exact endpoint."""
    schedule = make_schedule("vp_linear")
    noise = unit_noise(len(LABELS), seed=12)
    nfes, errors = [10, 20, 40, 80], []
    for nfe in nfes:
        solver = make_solver("ddim", nfe, schedule, grid="uniform_torch")
        x = solver.sample(digits, noise, class_labels=LABELS)
        exact = digits.exact_endpoint(noise / float(solver.scales[0]), float(solver.sigmas[0]), LABELS)
        errors.append(float((x - exact).pow(2).mean().sqrt()))
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert 0.8 < slope < 1.15, (slope, errors)


def test_heun_replays_the_recorded_edm_sampler():
    expected = torch.load(fixture_path("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.expected.pt"), weights_only=False)
    rec = expected["sampler"]
    calls = []

    def replay(x, sigma, class_labels=None):
        k = len(calls)
        calls.append(k)
        assert float(sigma) == pytest.approx(float(rec["call_sigmas"][k]), rel=1e-15)
        torch.testing.assert_close(x, rec["call_x"][k], rtol=0, atol=1e-10)
        return rec["call_D"][k].double()

    solver = Heun(rec["t_steps"])
    assert solver.nfe == rec["nfe"] == 9
    images = solver.sample(replay, rec["latents"].double())
    assert len(calls) == 9
    torch.testing.assert_close(images, rec["images"], rtol=0, atol=1e-10)
    torch.testing.assert_close(rec["t_steps"][:-1], karras_sigmas(5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,nfe,schedule", [("ddim", 7, "vp_linear"), ("euler", 4, "edm"), ("heun", 9, "edm"), ("heun", 1, "edm")])
def test_nfe_accounting_counts_denoiser_calls(digits, name, nfe, schedule):
    solver = make_solver(name, nfe, make_schedule(schedule))
    counter = CountingDenoiser(digits)
    solver.sample(counter, unit_noise(2), torch.full((solver.num_stages,), 0.1, dtype=torch.float64))
    assert counter.calls == solver.nfe == nfe == solver.num_stages
    assert len(solver.lambda_fitted) == solver.num_stages


def test_invalid_nfe_and_names():
    with pytest.raises(NFEError, match="must be odd"):
        make_solver("heun", 8)
    with pytest.raises(NFEError, match="NFE ≥ 1"):
        make_solver("euler", 0)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("rk45", 5)
    solver = make_solver("euler", 5)
    with pytest.raises(ValueError, match="has 5 stages"):
        solver.sample(lambda x, s, c=None: x, unit_noise(1), torch.zeros(4))
