"""iPNDM, DPM-Solver-2/3, DPM-Solver++(2M/3M), DEIS tAB 1–3 and their D-variants (issue 3, method.md §3.2–3.5)."""
import math

import numpy as np
import pytest
import torch

from dode_lightning.denoisers import CountingDenoiser, DiscreteEpsDenoiser
from dode_lightning.grids import make_sigmas
from dode_lightning.schedules import make_schedule
from dode_lightning.solvers import (
    DDIM,
    DEIS3,
    IPNDM,
    SOLVERS,
    DPMSolver3,
    NFEError,
    deis_coefficients,
    make_solver,
    multistep_orders,
    singlestep_orders,
)
from tests.conftest import unit_noise

HIGH_ORDER = ["ipndm", "dpm_solver_2", "dpm_solver_3", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "deis_1", "deis_2", "deis_3"]
LABELS = torch.arange(10) % 10


def _states(solver, denoiser, noise, lambdas=None, labels=None):
    states = []
    solver.sample(denoiser, noise, lambdas, labels, observe=lambda k, stage, x: states.append(x.clone()))
    return states


def test_all_names_registered():
    assert set(HIGH_ORDER) <= set(SOLVERS)


@pytest.mark.parametrize("schedule", ["vp_linear", "edm"])
@pytest.mark.parametrize("name", HIGH_ORDER)
def test_zero_lambda_is_the_base_solver_bit_for_bit(digits, name, schedule):
    solver = make_solver(name, 7, make_schedule(schedule))
    noise = unit_noise(4)
    assert torch.equal(solver.sample(digits, noise, torch.zeros(solver.num_stages, dtype=torch.float64)), solver.sample(digits, noise))
    assert torch.equal(solver.sample(digits, noise.float(), torch.zeros(solver.num_stages)), solver.sample(digits, noise.float()))


@pytest.mark.parametrize("name", HIGH_ORDER)
def test_nonzero_lambda_changes_exactly_the_stages_from_k_on(digits, name):
    solver = make_solver(name, 8, make_schedule("vp_linear"))
    noise = unit_noise(3)
    base = _states(solver, digits, noise, labels=LABELS[:3])
    for k, free in enumerate(solver.lambda_fitted):
        lambdas = torch.zeros(solver.num_stages, dtype=torch.float64)
        lambdas[k] = 0.3
        states = _states(solver, digits, noise, lambdas, LABELS[:3])
        assert all(torch.equal(a, b) for a, b in zip(states[:k], base[:k]))
        if free:
            assert all(not torch.equal(a, b) for a, b in zip(states[k:], base[k:])), k
        else:
            assert all(torch.equal(a, b) for a, b in zip(states, base))
    assert solver.lambda_fitted == [not name.startswith("dpm_solver_pp") or k > 0 for k in range(solver.nfe)]


@pytest.mark.parametrize("name", HIGH_ORDER)
@pytest.mark.parametrize("nfe", [3, 10])
def test_nfe_and_stage_accounting_with_an_eps_model_and_labels(digits, name, nfe):
    """A discrete-time ε-model through DiscreteEpsDenoiser, class-conditional: one stage and one λ per evaluation."""
    schedule = make_schedule("vp_linear")

    def eps_model(x_vp, t, labels):
        sigma = schedule.sigma(t.double()).reshape(-1, 1, 1, 1)
        x_ve = x_vp * torch.sqrt(1 + sigma**2)
        return (x_ve - digits(x_ve, sigma.reshape(-1), labels)) / sigma

    solver = make_solver(name, nfe, schedule)
    counting = CountingDenoiser(DiscreteEpsDenoiser(eps_model, schedule, conditional=True))
    stages = []
    out = solver.sample(counting, unit_noise(10), class_labels=LABELS, observe=lambda k, stage, x: stages.append(stage))
    assert counting.calls == solver.nfe == nfe == solver.num_stages == len(solver.lambda_fitted) == len(stages)
    assert [s.sigma_next for s in stages] == solver.target_sigmas.tolist()
    # CountingDenoiser records σ via torch.as_tensor(float), i.e. in float32.
    assert [s.sigma for s in stages] == pytest.approx([float(s) for s in counting.sigmas], rel=1e-6)
    assert all(float(s) > 0 for s in counting.sigmas)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", HIGH_ORDER)
def test_edm_x0_model_with_labels_lands_near_the_exact_endpoint(digits, name):
    """EDM-form x₀ model on its default grid: at NFE 30 every solver is close to the exact ODE endpoint."""
    solver = make_solver(name, 30, make_schedule("edm"))
    noise = unit_noise(10)
    out = solver.sample(digits, noise, class_labels=LABELS)
    x_start = solver.init_state(noise) / float(solver.scales[0])
    exact = digits.flow(x_start, float(solver.sigmas[0]), float(solver.sigmas[-1]), LABELS) * float(solver.scales[-1])
    assert (out - exact).pow(2).mean().sqrt() < 0.05


@pytest.mark.parametrize(
    "name,smallest", [("dpm_solver_2", 2), ("dpm_solver_3", 3), ("dpm_solver_pp_2m", 2), ("dpm_solver_pp_3m", 3), ("deis_1", 1), ("deis_2", 2), ("deis_3", 3), ("ipndm", 1)]
)
def test_too_small_nfe_names_the_smallest_valid_nfe(name, smallest):
    for nfe in range(smallest - 1, 0 - 1, -1):
        with pytest.raises(NFEError, match=f"NFE ≥ {smallest}"):
            make_solver(name, nfe, make_schedule("vp_linear"))
    assert make_solver(name, smallest, make_schedule("vp_linear")).nfe == smallest
    with pytest.raises(NFEError):
        SOLVERS[name](torch.linspace(10, 1, smallest))  # too few nodes given directly


def test_singlestep_order_patterns():
    assert singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert singlestep_orders(5, 3) == [3, 2]
    assert singlestep_orders(3, 3) == [2, 1]
    assert singlestep_orders(25, 3) == [3] * 8 + [1]
    assert singlestep_orders(50, 3) == [3] * 16 + [2]
    assert singlestep_orders(6, 3) == [3, 2, 1]
    assert singlestep_orders(9, 2) == [2] * 4 + [1]
    assert singlestep_orders(10, 2) == [2] * 5
    assert all(sum(singlestep_orders(n, q)) == n for n in range(3, 40) for q in (2, 3))


def test_multistep_orders_warm_up_and_lower_order_final():
    edm = make_schedule("edm")
    assert multistep_orders(make_sigmas("karras", 6, edm), 3, 15) == [1, 2, 3, 3, 2, 1]
    assert multistep_orders(make_sigmas("karras", 6, edm), 3, 0) == [1, 2, 3, 3, 3, 1]  # σ = 0 at the end: order 1
    assert multistep_orders(make_sigmas("karras", 6, edm, terminal_zero=False), 3, 0) == [1, 2, 3, 3, 3, 3]
    assert multistep_orders(make_sigmas("karras", 20, edm), 3, 15) == [1, 2] + [3] * 17 + [1]
    assert multistep_orders(make_sigmas("karras", 12, edm), 3, 10) == [1, 2] + [3] * 9 + [1]


def test_ipndm_of_order_one_is_ddim_bit_for_bit(digits):
    schedule = make_schedule("vp_linear")
    sigmas = make_sigmas("linspace_int", 6, schedule)
    noise = unit_noise(4)
    ipndm = IPNDM(sigmas, schedule.scale(sigmas), unit_prior=True, order=1)
    ddim = DDIM(sigmas, schedule.scale(sigmas), unit_prior=True)
    lambdas = torch.linspace(-0.2, 0.4, 6, dtype=torch.float64)
    assert torch.equal(ipndm.sample(digits, noise, lambdas), ddim.sample(digits, noise, lambdas))


def test_deis_coefficients_sum_to_the_ddim_coefficient_and_match_exact_integrals():
    # EDM: t = σ, so κ_kj = ∫ L_kj(σ) dσ is a polynomial integral (exact reference by numpy.polyint).
    sigmas = make_sigmas("karras", 8, make_schedule("edm"))
    scales = torch.ones_like(sigmas)
    kappa = deis_coefficients(sigmas, scales, 3, lambda s: s.clone())
    for k, row in enumerate(kappa):
        assert len(row) == min(k, 3) + 1
        assert math.isclose(sum(row), float(sigmas[k + 1] - sigmas[k]), rel_tol=1e-12)
        nodes = sigmas[k - len(row) + 1 : k + 1].flip(0).numpy()
        for j, value in enumerate(row):
            basis = np.poly1d([1.0])
            for m, node in enumerate(nodes):
                if m != j:
                    basis = basis * np.poly1d([1.0, -node]) / (nodes[j] - node)
            antiderivative = np.polyint(basis)
            assert math.isclose(value, antiderivative(float(sigmas[k + 1])) - antiderivative(float(sigmas[k])), rel_tol=1e-9, abs_tol=1e-12)


def test_deis_t_basis_on_discrete_vp_matches_a_fine_riemann_sum():
    """The official rule: a 10,000-point left Riemann sum in t of s_{k+1}·L_kj(τ)·σ'(τ) (here as Σ L·Δσ)."""
    schedule = make_schedule("vp_linear")
    solver = DEIS3.from_grid(make_sigmas("linspace_int", 5, schedule), schedule)
    times = schedule.sigma_inv(solver.sigmas)
    for k, row in enumerate(solver.coefficients):
        assert math.isclose(sum(row), float(solver.scales[k + 1] * (solver.sigmas[k + 1] - solver.sigmas[k])), rel_tol=1e-12)
        tau = torch.linspace(float(times[k]), float(times[k + 1]), 10_001, dtype=torch.float64)
        d_sigma = schedule.sigma(tau).diff()
        nodes = times[k - len(row) + 1 : k + 1].flip(0).tolist()
        for j, value in enumerate(row):
            basis = torch.ones_like(tau[:-1])
            for m, node in enumerate(nodes):
                if m != j:
                    basis = basis * (tau[:-1] - node) / (nodes[j] - node)
            riemann = float(solver.scales[k + 1]) * float((basis * d_sigma).sum())
            assert math.isclose(value, riemann, rel_tol=2e-3, abs_tol=1e-6), (k, j, value, riemann)


def _dpm_solver_reference(eps_fn, x, sigmas, orders, lambdas):
    """DPM-Solver singlestep written directly from method.md §3.4 in (log α, σ_vp, ℓ) with expm1, λ applied per stage."""
    log_alpha = -0.5 * torch.log1p(sigmas**2)
    sigma_vp, ell = sigmas / torch.sqrt(1 + sigmas**2), -torch.log(sigmas)
    lam = iter(lambdas)
    eps_prev, n = x, 0
    for q in orders:
        s, t = n, n + q
        h = float(ell[t] - ell[s])
        a = lambda u: float(torch.exp(log_alpha[u] - log_alpha[s]))  # noqa: E731
        eps_s = eps_fn(x, s)
        phi_1 = math.expm1(h)
        if q == 1:
            x_t = a(t) * x - float(sigma_vp[t]) * phi_1 * eps_s
            x_new = x_t + next(lam) * (-float(sigma_vp[t]) * phi_1) * (eps_s - eps_prev)
            eps_prev = eps_s
        else:
            r1 = float(ell[s + 1] - ell[s]) / h
            phi_11 = math.expm1(r1 * h)
            u1 = a(s + 1) * x - float(sigma_vp[s + 1]) * phi_11 * eps_s
            u1 = u1 + next(lam) * (-float(sigma_vp[s + 1]) * phi_11) * (eps_s - eps_prev)
            eps_1 = eps_fn(u1, s + 1)
            if q == 2:
                c = -(0.5 / r1) * float(sigma_vp[t]) * phi_1
                x_t = a(t) * x - float(sigma_vp[t]) * phi_1 * eps_s + c * (eps_1 - eps_s)
                x_new = x_t + next(lam) * c * (eps_1 - eps_s)
                eps_prev = eps_1
            else:
                r2 = float(ell[s + 2] - ell[s]) / h
                phi_12, phi_22, phi_2 = math.expm1(r2 * h), math.expm1(r2 * h) / (r2 * h) - 1, phi_1 / h - 1
                c_b = -(r2 / r1) * float(sigma_vp[s + 2]) * phi_22
                u2 = a(s + 2) * x - float(sigma_vp[s + 2]) * phi_12 * eps_s + c_b * (eps_1 - eps_s)
                u2 = u2 + next(lam) * c_b * (eps_1 - eps_s)
                eps_2 = eps_fn(u2, s + 2)
                c_c = -(1 / r2) * float(sigma_vp[t]) * phi_2
                x_t = a(t) * x - float(sigma_vp[t]) * phi_1 * eps_s + c_c * (eps_2 - eps_s)
                x_new = x_t + next(lam) * c_c * (eps_2 - eps_1)
                eps_prev = eps_2
        x, n = x_new, t
    return x


@pytest.mark.parametrize("name,nfe", [("dpm_solver_3", 5), ("dpm_solver_3", 10), ("dpm_solver_3", 6), ("dpm_solver_2", 7)])
@pytest.mark.parametrize("with_lambda", [False, True])
def test_dpm_solver_matches_the_log_snr_formulas(digits, name, nfe, with_lambda):
    schedule = make_schedule("vp_linear")
    solver = make_solver(name, nfe, schedule)
    noise = unit_noise(5)
    lambdas = torch.linspace(-0.3, 0.5, nfe, dtype=torch.float64) if with_lambda else torch.zeros(nfe, dtype=torch.float64)

    def eps_fn(x_vp, n):
        sigma = float(solver.sigmas[n])
        x_ve = x_vp * math.sqrt(1 + sigma**2)
        return (x_ve - digits(x_ve, sigma, LABELS[:5])) / sigma

    expected = _dpm_solver_reference(eps_fn, noise, solver.sigmas, solver.orders, lambdas.tolist())
    out = solver.sample(digits, noise, lambdas, LABELS[:5])
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)  # equal algebra, different rounding


def test_dpm_solver_rejects_a_terminal_zero_under_a_high_order_step():
    sigmas = make_sigmas("logsnr_uniform", 5, make_schedule("edm"))  # 5 points + 0: orders [3, 2] end at σ = 0
    with pytest.raises(ValueError, match="terminal_zero=False"):
        DPMSolver3(sigmas)
    assert DPMSolver3(make_sigmas("logsnr_uniform", 4, make_schedule("edm"))).orders == [3, 1]


def _slopes(digits, name, schedule, nfes, **grid):
    """RMS error against the exact probability-flow solution between the grid's end points, and log-log slopes."""
    noise = unit_noise(10, seed=1)
    errors = []
    for nfe in nfes:
        solver = make_solver(name, nfe, schedule, **grid)
        out = solver.sample(digits, noise, class_labels=LABELS)
        x_start = solver.init_state(noise) / float(solver.scales[0])
        exact = digits.flow(x_start, float(solver.sigmas[0]), float(solver.sigmas[-1]), LABELS) * float(solver.scales[-1])
        errors.append(float((out - exact).pow(2).mean().sqrt()))
    slopes = [-math.log(errors[i + 1] / errors[i]) / math.log(nfes[i + 1] / nfes[i]) for i in range(len(nfes) - 1)]
    print(f"\n{name} on {type(schedule).__name__} {grid}: NFE {nfes} RMS {['%.2e' % e for e in errors]} slopes {['%.2f' % s for s in slopes]}")
    return slopes


LOGSNR = {"grid": "logsnr_uniform", "terminal_zero": False}


@pytest.mark.parametrize(
    "name,schedule,nfes,band",
    [
        ("dpm_solver_2", "vp_linear", [24, 48, 96], (1.8, 2.3)),
        # NFE ≡ 2 (mod 3): the pattern ends [.., 3, 2]; NFE ≡ 0, 1 end in a first-order step that caps the slope at 2.
        ("dpm_solver_3", "vp_linear", [26, 50, 98], (2.7, 3.8)),
        ("dpm_solver_pp_2m", "edm", [48, 96, 192], (1.8, 2.3)),
        ("deis_1", "vp_linear", [48, 96, 192], (1.8, 2.3)),
        ("deis_2", "vp_linear", [48, 96, 192], (2.6, 3.3)),
        # tAB-3 interpolates ε with a cubic: local error O(h⁵), global order 4, approached from below.
        ("deis_3", "vp_linear", [48, 96, 192], (3.2, 4.4)),
    ],
)
def test_convergence_order_on_the_exact_model(digits, name, schedule, nfes, band):
    slopes = _slopes(digits, name, make_schedule(schedule), nfes, **LOGSNR)
    assert all(band[0] < s < band[1] for s in slopes), slopes


def test_dpm_solver_pp_3m_reference_formula_converges_at_second_order(digits):
    """The 3M update of method.md §3.5 (= DPM-Solver, diffusers, k-diffusion) weights D2 = (D1₀ − D1₁)/(r₀ + r₁) ≈ h²D''/2
    by φ₃, while the exponential integrator's D'' term is −α h²φ₃·D''; the missing factor 2 leaves a local error
    α h³D''/12, so the measured order is 2 (with a smaller constant than 2M)."""
    slopes = _slopes(digits, "dpm_solver_pp_3m", make_schedule("edm"), [48, 96, 192], **LOGSNR)
    assert all(1.8 < s < 2.4 for s in slopes), slopes
    assert _slopes(digits, "dpm_solver_pp_3m", make_schedule("vp_linear"), [96, 192], **LOGSNR)[0] < 2.4


def test_ipndm_convergence_order(digits):
    """iPNDM's fixed Adams–Bashforth weights assume equal steps in σ (the variable DDIM integrates in): on a σ-uniform
    grid it climbs towards order 4; on a smooth non-uniform grid the step-size variation leaves order 2."""
    uniform = _slopes(digits, "ipndm", make_schedule("edm"), [48, 96, 192], grid="time_uniform", terminal_zero=False, sigma_min=0.2, sigma_max=5.0)
    assert uniform[-1] > 3.0 and uniform[-1] > uniform[0], uniform
    smooth = _slopes(digits, "ipndm", make_schedule("vp_linear"), [48, 96, 192], **LOGSNR)
    assert all(1.8 < s < 2.3 for s in smooth), smooth
