import torch

from dode_lightning.denoisers import DiscreteEpsDenoiser, eps_from_x0, x0_from_eps
from dode_lightning.schedules import make_schedule
from tests.conftest import unit_noise


def test_eps_x0_round_trip():
    x, x0 = unit_noise(4, seed=1) * 3, unit_noise(4, seed=2)
    sigma = torch.tensor([0.5, 1.0, 2.0, 40.0], dtype=torch.float64)
    eps = eps_from_x0(x, sigma, x0)
    torch.testing.assert_close(x0_from_eps(x, sigma, eps), x0)


class ExactEpsModel:
    """The digits mixture as a discrete-time ε-network: ε(x_vp, t) = (x − D*(x; σ_t))/σ_t with x = x_vp/α_t."""

    def __init__(self, mixture, schedule):
        self.mixture, self.schedule, self.timesteps = mixture, schedule, []

    def __call__(self, x_vp, t):
        self.timesteps.append(t.clone())
        sigma = self.schedule.sigma(t.double()).reshape(-1, 1, 1, 1)
        x = x_vp * torch.sqrt(1 + sigma**2)
        return (x - self.mixture(x, sigma.reshape(-1))) / sigma


def test_discrete_eps_wrapper_recovers_exact_denoiser_on_the_grid(digits):
    schedule = make_schedule("vp_linear")
    model = ExactEpsModel(digits, schedule)
    denoiser = DiscreteEpsDenoiser(model, schedule)
    sigma = schedule.sigma(torch.tensor([999.0, 500.0, 10.0, 0.0]))
    x = unit_noise(4) * sigma.reshape(-1, 1, 1, 1) + digits.sample(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(denoiser(x, sigma), digits(x, sigma), rtol=1e-9, atol=1e-9)
    # On-grid σ reaches the model as the exact integer timestep.
    assert model.timesteps[-1].tolist() == [999.0, 500.0, 10.0, 0.0]


def test_discrete_eps_wrapper_off_grid_and_edges(digits):
    schedule = make_schedule("vp_linear")
    model = ExactEpsModel(digits, schedule)
    x = unit_noise(3)
    sigma = schedule.sigma(torch.tensor([250.5, 250.5, 250.5]))
    DiscreteEpsDenoiser(model, schedule)(x, sigma)
    assert torch.allclose(model.timesteps[-1], torch.tensor(250.5, dtype=torch.float64))
    DiscreteEpsDenoiser(model, schedule, integer_timesteps=True)(x, sigma)
    assert model.timesteps[-1].dtype == torch.int64
    DiscreteEpsDenoiser(model, schedule)(x, torch.tensor([1e4, 1e-4, 0.0]))
    assert model.timesteps[-1].tolist() == [999.0, 0.0, 0.0]  # clamped to the trained range
    out = DiscreteEpsDenoiser(model, schedule)(x, torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(out[2], x[2])  # σ = 0 is the identity
    DiscreteEpsDenoiser(model, schedule, time_shift=1.0)(x, schedule.sigma(torch.tensor([500.0] * 3)))
    assert model.timesteps[-1].tolist() == [499.0] * 3
