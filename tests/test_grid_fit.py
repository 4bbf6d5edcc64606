"""Fitted step positions (issue 12 item 3c): the grid's interior σ fitted against a UniPC-3 teacher's endpoint.

The fit sees only the teacher; the held-out check is against the exact mixture's ODE endpoint.
"""
import pytest
import torch

from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, rmse, seeded_noise, teacher_targets
from dode_lightning.grid_fit import distilled_final_state, fit_grid, grid_from_params, params_from_grid, teacher_endpoint
from dode_lightning.grids import karras_sigmas
from dode_lightning.schedules import EDM
from dode_lightning.solvers import SOLVERS, LambdaLayout


@pytest.fixture(scope="module")
def calib():
    return seeded_noise(range(100), (1, 8, 8))[0]


@pytest.fixture(scope="module")
def held_out():
    return seeded_noise(range(1_000_000, 1_000_060), (1, 8, 8))[0]


@pytest.mark.parametrize("terminal_zero", [True, False])
def test_parametrisation_keeps_endpoints_and_order(terminal_zero):
    sigmas = SolverSetup.resolve("euler", 6, EDM(), "karras", terminal_zero=terminal_zero).build().sigmas
    theta = params_from_grid(sigmas)
    assert torch.allclose(theta, torch.zeros_like(theta), atol=1e-9)  # the Karras grid is θ = 0
    assert torch.allclose(grid_from_params(theta, sigmas), sigmas, rtol=1e-12)
    for seed in range(5):
        moved = grid_from_params(3 * torch.randn(len(theta), generator=torch.Generator().manual_seed(seed), dtype=torch.float64), sigmas)
        assert len(moved) == len(sigmas) and float(moved[0]) == 80.0 and float(moved[-1]) == float(sigmas[-1])
        assert bool((moved[:-1] > moved[1:]).all())
    log_snr = torch.exp(torch.linspace(4.38, -6.2, 6, dtype=torch.float64))
    assert torch.allclose(grid_from_params(params_from_grid(log_snr), log_snr), log_snr, rtol=1e-12)


def test_a_grid_without_free_points_is_returned_unchanged(digits, calib):
    sigmas = torch.cat([karras_sigmas(2), torch.zeros(1, dtype=torch.float64)])
    fit = fit_grid("euler", sigmas, EDM(), digits, calib[:10], torch.zeros_like(calib[:10]))
    assert torch.equal(fit.sigmas, sigmas) and fit.loss_fit == fit.loss_initial


@pytest.mark.parametrize("name", ["euler", "ipndm"])
def test_fitted_grid_beats_karras_on_calibration_and_held_out(digits, calib, held_out, name):
    setup = SolverSetup.resolve(name, 5, EDM(), "karras", terminal_zero=False)
    student = setup.build()
    endpoint = teacher_endpoint(student, setup, digits, calib, 10)
    fit = fit_grid(name, student.sigmas, EDM(), digits, calib, endpoint)
    assert fit.loss_fit < 0.6 * fit.loss_initial  # measured 0.41× (Euler), 0.28× (iPNDM)
    fitted = SOLVERS[name].from_grid(fit.sigmas, EDM())
    exact = digits.exact_endpoint(student.init_state(held_out), 80.0, sigma_end=float(student.sigmas[-1]))
    base, moved = rmse(student.sample(digits, held_out), exact), rmse(fitted.sample(digits, held_out), exact)
    print(f"\n{name} NFE 5: calibration {fit.loss_initial:.4g} → {fit.loss_fit:.4g}, held-out RMSE {base:.4f} → {moved:.4f}")
    assert moved < 0.85 * base  # measured 0.67× (Euler), 0.73× (iPNDM) on 100 seeds

    # The closed-form λ fit runs on the fitted grid unchanged and improves on it further.
    teacher, indices = build_teacher(fitted, setup, 10, "aligned", "unipc_3")
    layout = LambdaLayout(fitted.num_stages)
    lambdas = fit_closed_form(fitted, digits, calib, teacher_targets(teacher, indices, digits, calib), layout=layout).lambdas
    d_fitted = rmse(fitted.sample(digits, held_out, layout.expand(lambdas, calib.shape[1:])), exact)
    assert d_fitted < moved


def test_joint_fit_lowers_the_d_solvers_calibration_loss(digits, calib):
    """Fitting the grid with the D h-all λ refitted on every trial grid lowers that D-solver's end error further."""
    setup = SolverSetup.resolve("ipndm", 5, EDM(), "karras", terminal_zero=False)
    student = setup.build()
    endpoint = teacher_endpoint(student, setup, digits, calib, 10)
    base_fit = fit_grid("ipndm", student.sigmas, EDM(), digits, calib, endpoint, max_evaluations=80)
    final_state = distilled_final_state(setup, digits, calib, 4)
    joint = fit_grid("ipndm", base_fit.sigmas, EDM(), digits, calib, endpoint, max_evaluations=40, final_state=final_state)
    assert joint.loss_fit < 0.7 * joint.loss_initial  # measured 0.2× with 81 runs
