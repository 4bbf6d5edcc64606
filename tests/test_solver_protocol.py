"""The one solver protocol (issue 19 item 1): `Evaluate` requests answered by `answer`, σ as differentiable tensors,
α/β coefficients that stay finite from σ_0 = ∞."""
import pytest
import torch

from dode_lightning.schedules import EDM, FlowMatching, VPContinuous
from dode_lightning.solvers import SOLVERS, Evaluate, Stage, answer, make_solver, run_stages
from tests.conftest import unit_noise

NFE = {"heun": 5, "dpm_solver_3": 6}


def _final_state(solver_class, sigmas, schedule, noise, digits, lambdas):
    solver = solver_class.from_grid(sigmas, schedule)
    rule = None if lambdas is None else (lambda k, _stage: lambdas[k])
    return run_stages(solver.stages(solver.init_state(noise)), digits, rule, detach=False)


@pytest.mark.parametrize("with_lambda", [False, True], ids=["base", "lambda"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_final_state_is_differentiable_in_every_sigma(digits, name, with_lambda):
    """d(final state)/d(σ_k) by autograd through the whole run equals central finite differences (float64, exact
    model, a smooth VP schedule so that α = s(σ) moves with σ too)."""
    schedule = VPContinuous()
    solver = make_solver(name, NFE.get(name, 5), schedule)
    noise = unit_noise(2)
    lambdas = None
    if with_lambda:
        fitted = torch.tensor(solver.lambda_fitted, dtype=torch.float64)
        lambdas = 0.3 * torch.linspace(-1.0, 1.0, solver.num_stages, dtype=torch.float64) * fitted
    weights = torch.randn(noise.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def objective(sigmas):
        return (_final_state(type(solver), sigmas, schedule, noise, digits, lambdas) * weights).sum()

    sigmas = solver.sigmas.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(sigmas), sigmas)
    positive = [k for k in range(len(sigmas)) if float(solver.sigmas[k]) > 0]
    with torch.no_grad():
        for k in positive:
            step = 1e-4 * float(solver.sigmas[k])
            up, down = solver.sigmas.clone(), solver.sigmas.clone()
            up[k] += step
            down[k] -= step
            finite_difference = (objective(up) - objective(down)) / (2 * step)
            assert float(grad[k]) == pytest.approx(float(finite_difference), rel=1e-5, abs=1e-6 * float(grad.abs().max())), (k, grad)
    assert bool(torch.isfinite(grad).all())


def test_answer_builds_the_denoiser_call(digits):
    x = unit_noise(2)
    scale, sigma = torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    denoised = answer(digits, Evaluate(x, sigma, scale), None)
    assert torch.equal(denoised, digits(x / scale, sigma))
    eps, both = answer(digits, Evaluate(x, sigma, scale, eps=True), None)
    assert torch.equal(both, denoised) and torch.allclose(eps, (x / scale - denoised) / 3.0)


def test_solvers_take_only_the_state_and_yield_requests_then_stages(digits):
    solver = make_solver("dpm_solver_pp_2m", 4, EDM())
    gen = solver.stages(solver.init_state(unit_noise(1)))
    message, kinds = next(gen), []
    try:
        while True:
            kinds.append(type(message).__name__)
            reply = answer(digits, message) if isinstance(message, Evaluate) else message.base
            if isinstance(message, Stage):
                assert message.coeff.dim() == message.sigma.dim() == message.sigma_next.dim() == 0
            message = gen.send(reply)
    except StopIteration:
        pass
    assert kinds == ["Evaluate", "Stage"] * 4


@pytest.mark.parametrize("name", ["ddim", "euler", "ipndm", "deis_1", "deis_2", "deis_3", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_2"])
def test_runs_are_finite_from_sigma_infinity(name):
    """α/β coefficients: from σ_0 = ∞ (s_0 = 0, β_0 = 1) every update is finite when the network answers finite
    (ε̂, x̂₀) there (a toy answer: ε̂ = x, x̂₀ = tanh(x)/3). Only the noise-side Δ_0 (b_0 = −∞) is not."""
    solver = make_solver(name, 6, FlowMatching())
    assert float(solver.sigmas[0]) == float("inf") and float(solver.scales[0]) == 0.0 and float(solver.noise_scales[0]) == 1.0
    gen = solver.stages(solver.init_state(unit_noise(1)))
    message, stages = next(gen), 0
    try:
        while True:
            if isinstance(message, Evaluate):
                denoised = torch.tanh(message.x) / 3
                message = gen.send((message.x, denoised) if message.eps else denoised)
                continue
            assert bool(torch.isfinite(message.base).all()), stages
            assert message.delta is None or bool(torch.isfinite(message.delta).all()) or (stages == 0 and solver.prediction == "noise")
            stages += 1
            message = gen.send(message.base)
    except StopIteration as stop:
        assert stages == solver.num_stages and bool(torch.isfinite(stop.value).all())
