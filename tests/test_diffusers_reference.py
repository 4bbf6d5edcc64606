"""Independent references: diffusers' schedulers on the same ε-model and the same noise levels (issue 3).

Deliberate differences, and how each comparison puts both sides on a grid they can share:
- diffusers keeps its σ table in float32; our solvers are run on exactly those σ values (cast to float64), the
  model is the exact class-conditional digits ε-model on the linear-β VP schedule, called at integer timesteps.
  Where diffusers' coefficient arithmetic is float32 (DEIS, singlestep), the tight comparison upcasts its σ table
  (same values) so both sides compute in float64; the stock float32 run is compared to 1e-4.
  DPMSolverMultistepScheduler.step casts the state itself to float32, so it is compared stock (differences ~1e-6).
- DPMSolverMultistepScheduler (dpmsolver++, midpoint): its default grid round(linspace(0, T−1, N+1)) + σ = 0; its
  lower-order-final rule (N < 15, and order 1 into σ = 0) is ours with `lower_order_final_below=15` (the default).
- DEISMultistepScheduler implements only the log-ρ variant (Lagrange basis in log σ, closed-form integrals) and
  counts order as the number of nodes: its `solver_order = r + 1` is our `deis_r` with `basis="log_sigma"`. Its grid
  ends at σ(t = 0) > 0; lower-order-final again below N = 15. Our default tAB-DEIS (basis t) is not in diffusers.
- IPNDMScheduler integrates its own trigonometric schedule and expects a v-like output (ε = σ_vp·x + α·output).
  Its `trained_betas` (the σ_vp of each step) accept any grid, so it is run on our `linspace_int` grid and given
  output = (ε − σ_vp·x)/α; the algorithm (AB weights with warm-up, DDIM transfer) then coincides exactly.
- DPMSolverSinglestepScheduler coincides with our singlestep order 2 (order 3 uses a different intermediate update).
"""
import pytest
import torch

from dode_lightning.denoisers import DiscreteEpsDenoiser
from dode_lightning.grids import make_sigmas
from dode_lightning.schedules import make_schedule
from dode_lightning.solvers import DEIS1, DEIS2, IPNDM, DPMSolver2, DPMSolverPP2M, DPMSolverPP3M, UniPC2, UniPC3
from tests.conftest import unit_noise

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 copy= warnings

LABELS = torch.arange(10) % 10
TOL = 1e-5
FLOAT32_TOL = 1e-4  # stock diffusers: σ table and coefficient arithmetic in float32 (e.g. DEIS's ind_fn differences)


@pytest.fixture(scope="module")
def vp():
    return make_schedule("vp_linear")


@pytest.fixture
def eps_model(digits, vp):
    """Exact ε̂(x_vp, t) = (x − D*(x; σ_t))/σ_t with x = x_vp·√(1+σ_t²), at integer timesteps t (method.md §9.3)."""

    def model(x_vp, t):
        t = torch.as_tensor(t).reshape(-1).expand(x_vp.shape[0])
        sigma = vp.sigma(t.double()).reshape(-1, 1, 1, 1)
        x_ve = x_vp * torch.sqrt(1 + sigma**2)
        return (x_ve - digits(x_ve, sigma.reshape(-1), LABELS)) / sigma

    return model


def _ours(solver, denoiser, noise):
    states = []
    solver.sample(denoiser, noise, class_labels=LABELS, observe=lambda k, stage, x: states.append(x.clone()))
    return states


def _theirs(scheduler, model, noise, to_output=lambda eps, x, i: eps):
    x, states = noise.clone(), []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(to_output(model(x, t), x, i), t, x).prev_sample
        states.append(x.clone())
    return states


def _max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


def _vp_solver(cls, sigmas, **kwargs):
    sigmas = sigmas.double()
    return cls(sigmas, 1 / torch.sqrt(1 + sigmas**2), unit_prior=True, **kwargs)


@pytest.mark.parametrize("order,cls", [(2, DPMSolverPP2M), (3, DPMSolverPP3M)])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpm_solver_pp_matches_diffusers_multistep(eps_model, vp, order, cls, steps):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint", lower_order_final=True
    )
    scheduler.set_timesteps(steps)
    noise = unit_noise(10, seed=2)  # its `step` casts the state to float32: differences ~1e-6 are that rounding
    theirs = _theirs(scheduler, eps_model, noise)
    solver = _vp_solver(cls, scheduler.sigmas)
    ours = _ours(solver, DiscreteEpsDenoiser(eps_model, vp, integer_timesteps=True), noise)
    diff = _max_diff(ours, theirs)
    print(f"\ndiffusers DPMSolverMultistep order {order}, N = {steps}: max |Δ| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("order,cls", [(2, UniPC2), (3, UniPC3)])
@pytest.mark.parametrize("steps", [5, 8, 20])
def test_unipc_matches_diffusers(eps_model, vp, order, cls, steps):
    """UniPC-bh2 (predict_x0, corrector after every evaluation, lower_order_final) on diffusers' own σ list."""
    scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_order=order, solver_type="bh2", lower_order_final=True)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()  # same values; its coefficient arithmetic then runs in float64
    noise = unit_noise(10, seed=6)
    x, theirs = noise.clone(), [noise.clone()]
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, t), t, x).prev_sample
        if scheduler.step_index > 1:
            theirs.append(scheduler.last_sample.clone())  # the state its corrector produced at this step
    theirs.append(x)
    solver = _vp_solver(cls, scheduler.sigmas)
    ours = _ours(solver, DiscreteEpsDenoiser(eps_model, vp, integer_timesteps=True), noise)
    diff = _max_diff(ours, theirs)
    print(f"\ndiffusers UniPCMultistep bh2 order {order}, N = {steps}: max |Δ| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("order,cls", [(2, DEIS1), (3, DEIS2)])
@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("float64_table", [True, False])
def test_log_rho_deis_matches_diffusers(eps_model, vp, order, cls, steps, float64_table):
    scheduler = diffusers.DEISMultistepScheduler(beta_schedule="linear", solver_order=order, lower_order_final=True)
    scheduler.set_timesteps(steps)
    if float64_table:
        scheduler.sigmas = scheduler.sigmas.double()  # same values; its coefficient arithmetic then runs in float64
    noise = unit_noise(10, seed=3)
    theirs = _theirs(scheduler, eps_model, noise)
    solver = _vp_solver(cls, scheduler.sigmas, basis="log_sigma", lower_order_final_below=15)
    ours = _ours(solver, DiscreteEpsDenoiser(eps_model, vp, integer_timesteps=True), noise)
    diff = _max_diff(ours, theirs)
    print(f"\ndiffusers DEISMultistep order {order} (our deis_{order - 1}, log σ basis), N = {steps}, float64 table {float64_table}: max |Δ| = {diff:.2e}")
    assert diff < (TOL if float64_table else FLOAT32_TOL)


@pytest.mark.parametrize("steps", [3, 6, 12])
def test_ipndm_matches_diffusers_on_a_shared_grid(digits, vp, steps):
    sigma_vp = (lambda s: s / torch.sqrt(1 + s**2))(make_sigmas("linspace_int", steps, vp))
    scheduler = diffusers.IPNDMScheduler(trained_betas=sigma_vp.tolist())
    scheduler.set_timesteps(steps)
    beta, alpha = scheduler.betas.double(), scheduler.alphas.double()  # σ_vp and α, as diffusers rounded them
    sigmas = beta / alpha

    def model(x_vp, t):
        i = int((scheduler.timesteps == t).nonzero())
        x_ve = x_vp / alpha[i]
        return (x_ve - digits(x_ve, float(sigmas[i]), LABELS)) / sigmas[i]

    noise = unit_noise(10, seed=4)
    theirs = _theirs(scheduler, model, noise, to_output=lambda eps, x, i: (eps - beta[i] * x) / alpha[i])
    ours = _ours(IPNDM(sigmas, alpha, unit_prior=True), digits, noise)
    diff = _max_diff(ours, theirs)
    print(f"\ndiffusers IPNDM, N = {steps}: max |Δ| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("steps", [6, 9])
@pytest.mark.parametrize("float64_table", [True, False])
def test_singlestep_dpm_solver_2_matches_diffusers(eps_model, vp, steps, float64_table):
    scheduler = diffusers.DPMSolverSinglestepScheduler(
        beta_schedule="linear", algorithm_type="dpmsolver", solver_order=2, solver_type="midpoint",
        lower_order_final=False, final_sigmas_type="sigma_min",
    )
    scheduler.set_timesteps(steps)
    if float64_table:
        scheduler.sigmas = scheduler.sigmas.double()  # same values; its coefficient arithmetic then runs in float64
    noise = unit_noise(10, seed=5)
    theirs = _theirs(scheduler, eps_model, noise)
    solver = _vp_solver(DPMSolver2, scheduler.sigmas)
    ours = _ours(solver, DiscreteEpsDenoiser(eps_model, vp, integer_timesteps=True), noise)
    diff = _max_diff(ours, theirs)
    print(f"\ndiffusers DPMSolverSinglestep order 2, N = {steps}: orders {solver.orders}, float64 table {float64_table}: max |Δ| = {diff:.2e}")
    assert diff < (TOL if float64_table else FLOAT32_TOL)
