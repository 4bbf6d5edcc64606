import math

import pytest
import torch

from dode_lightning.grids import karras_sigmas, linspace_int_timesteps, make_sigmas, uniform_torch_timesteps
from dode_lightning.schedules import EDM, VE, VPContinuous, VPDiscrete, cosine_betas, make_schedule
from tests.conftest import fixture_path


def test_vp_discrete_alphas_cumprod_match_diffusers_fixture():
    expected = torch.load(fixture_path("diffusers", "tiny-ddpm.expected.pt"), weights_only=False)
    schedule = VPDiscrete(expected["betas"].double())
    torch.testing.assert_close(schedule.alphas_cumprod, expected["alphas_cumprod"].double(), atol=1e-6, rtol=0)


def test_vp_discrete_sigma_at_integer_and_fractional_timesteps():
    schedule = make_schedule("vp_linear")
    abar = schedule.alphas_cumprod
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    torch.testing.assert_close(schedule.sigma(t), torch.sqrt((1 - abar[t.long()]) / abar[t.long()]), rtol=1e-14, atol=0)
    assert float(schedule.sigma(-1.0)) == 0.0 and math.copysign(1, float(schedule.sigma(-1.0))) == 1
    # Fractional t interpolates log α linearly (DPM-Solver's continuous extension).
    mid = 0.25 * torch.log(abar[500]) + 0.25 * torch.log(abar[501])
    assert float(schedule.sigma(500.5)) == pytest.approx(math.sqrt(math.exp(-2 * mid) - 1), rel=1e-12)
    ts = torch.tensor([-1.0, 0.0, 0.3, 17.0, 640.75, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_inv(schedule.sigma(ts)), ts, atol=1e-9, rtol=0)


def test_cosine_betas_follow_the_closed_form():
    schedule = VPDiscrete(cosine_betas(4000))
    s = 0.008
    f = lambda t: math.cos((t / 4000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert float(schedule.alphas_cumprod[1999]) == pytest.approx(f(2000) / f(0), rel=1e-10)
    assert float(cosine_betas(1000).max()) == pytest.approx(0.999)


def test_vp_continuous_matches_edm_range():
    schedule = VPContinuous()
    assert schedule.sigma_max == pytest.approx(152.1667, rel=1e-5)
    assert schedule.sigma_min == pytest.approx(0.0010005, rel=1e-3)
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_inv(schedule.sigma(t)), t, rtol=1e-10, atol=0)


def test_ve_and_edm_and_scales():
    assert float(VE().sigma(4.0)) == 2.0 and float(VE().sigma_inv(3.0)) == 9.0
    assert float(EDM().sigma(3.5)) == 3.5
    assert float(EDM().scale(10.0)) == 1.0
    assert float(make_schedule("vp_linear").scale(3.0)) == pytest.approx(1 / math.sqrt(10))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("nope")


def test_karras_grid_matches_recorded_edm_sampler():
    expected = torch.load(fixture_path("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.expected.pt"), weights_only=False)
    ours = make_sigmas("karras", 5, EDM())
    torch.testing.assert_close(ours, expected["sampler"]["t_steps"], rtol=0, atol=1e-12)


def test_karras_refinement_contains_coarse_grid():
    coarse = karras_sigmas(5)
    fine = karras_sigmas(10 * 4 + 1)
    torch.testing.assert_close(fine[::10], coarse, rtol=1e-13, atol=0)


def test_official_integer_grids():
    assert uniform_torch_timesteps(10).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    assert uniform_torch_timesteps(3).tolist() == [666, 333, 0, -1]
    assert linspace_int_timesteps(5).tolist() == [999, 799, 599, 399, 199, 0]
    sigmas = make_sigmas("uniform_torch", 10, make_schedule("vp_linear"))
    assert len(sigmas) == 11 and float(sigmas[-1]) == 0.0
    assert len(make_sigmas("linspace_int", 5, make_schedule("vp_linear"))) == 6


def test_continuous_grids_have_their_spacing():
    schedule = VPContinuous()
    sig = make_sigmas("time_uniform", 4, schedule, terminal_zero=False)
    t = schedule.sigma_inv(sig)
    torch.testing.assert_close(torch.diff(t), torch.full((4,), (schedule.t_min - 1) / 4, dtype=torch.float64))
    sig = make_sigmas("logsnr_uniform", 6, EDM(), terminal_zero=False)
    logs = torch.log(sig)
    torch.testing.assert_close(torch.diff(logs), torch.full((6,), float(logs[1] - logs[0]), dtype=torch.float64))
    quad = make_sigmas("time_quadratic", 4, EDM(), terminal_zero=False)
    gaps = -torch.diff(quad)
    assert bool((gaps[:-1] > gaps[1:]).all())  # denser towards the data end
    with pytest.raises(ValueError, match="integer-timestep grid"):
        make_sigmas("uniform_torch", 4, EDM())
    with pytest.raises(ValueError, match="unknown grid"):
        make_sigmas("bogus", 4, EDM())
