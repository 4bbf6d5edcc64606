import numpy as np
import pytest
import torch

from dode_lightning.gmm import GaussianMixture
from tests.conftest import unit_noise


def test_digits_fit_is_class_mean_and_covariance(digits):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data) / 8 - 1
    members = x[torch.as_tensor(data.target) == 3]
    torch.testing.assert_close(digits.means[3], members.mean(0))
    cov = torch.as_tensor(np.cov(members.numpy().T, bias=True)) + 1e-3 * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(digits.covariances[3], cov, atol=1e-12, rtol=1e-10)
    assert digits.log_weights.exp().sum().item() == pytest.approx(1.0)
    assert digits.shape == (1, 8, 8)


def test_exact_denoiser_matches_brute_force_posterior_mean():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=torch.float64)
    a = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen)
    covs = a @ a.transpose(-1, -2) * 0.3 + 0.05 * torch.eye(2, dtype=torch.float64)
    mixture = GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]))
    x = torch.tensor([[0.7, 0.4], [-1.5, -0.5], [3.0, 2.0]], dtype=torch.float64)
    sigma = 0.8
    # E[x₀|x] = Σ x₀ N(x; x₀, σ²I) / Σ N(x; x₀, σ²I) with x₀ drawn from the mixture (importance sampling).
    samples = mixture.sample(400_000, torch.Generator().manual_seed(1))
    log_w = -((x[:, None, :] - samples[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(log_w, dim=1)
    brute = w @ samples
    torch.testing.assert_close(mixture(x, sigma), brute, atol=0.01, rtol=0)


def test_denoiser_limits_and_labels(digits):
    x = unit_noise(5) * 1e6
    data_mean = (digits.log_weights.exp()[:, None] * digits.means).sum(0).reshape(1, 8, 8)
    torch.testing.assert_close(digits(x, 1e6), data_mean.expand(5, 1, 8, 8), atol=1e-5, rtol=0)
    clean = digits.sample(5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(digits(clean, 1e-6), clean, atol=1e-7, rtol=0)
    labels = torch.tensor([0, 1, 2, 3, 4])
    one_hot = torch.nn.functional.one_hot(labels, 10).double()
    y = unit_noise(5, seed=4) * 2
    torch.testing.assert_close(digits(y, 2.0, labels), digits(y, 2.0, one_hot))
    # Class-conditional = the single component's posterior mean.
    k = 2
    cov, mu = digits.covariances[k], digits.means[k]
    manual = mu + (cov @ torch.linalg.solve(cov + 4.0 * torch.eye(64, dtype=torch.float64), (y[2].reshape(-1) - mu)))
    torch.testing.assert_close(digits(y, 2.0, labels)[2].reshape(-1), manual, atol=1e-10, rtol=0)
    assert digits(y.float(), 2.0).dtype == torch.float32


def test_mixture_samples_have_fitted_moments(digits):
    labels = torch.full((100_000,), 7)
    samples = digits.sample(100_000, torch.Generator().manual_seed(5), labels).reshape(100_000, -1)
    torch.testing.assert_close(samples.mean(0), digits.means[7], atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), digits.covariances[7], atol=0.02, rtol=0)
    mixed = digits.sample(50_000, torch.Generator().manual_seed(6)).reshape(50_000, -1)
    overall = (digits.log_weights.exp()[:, None] * digits.means).sum(0)
    torch.testing.assert_close(mixed.mean(0), overall, atol=0.02, rtol=0)


def test_integrator_matches_closed_form_on_a_single_gaussian(digits):
    # Two identical components: the mixture ODE is one Gaussian's, but the integrator path is taken.
    twin = GaussianMixture(digits.means[[4, 4]], digits.covariances[[4, 4]], shape=(1, 8, 8))
    x = unit_noise(8, seed=7) * 80
    closed = twin.flow(x, 80.0, 0.0)
    integrated = twin.exact_endpoint(x, 80.0)
    rel = (integrated - closed).norm() / closed.norm()
    assert rel < 1e-6, rel
    midway = twin.exact_endpoint(x, 80.0, sigma_end=0.5)
    assert (midway - twin.flow(x, 80.0, 0.5)).norm() / midway.norm() < 1e-6


def test_mixture_endpoint_is_converged(digits):
    x = unit_noise(16, seed=8) * 80
    coarse = digits.exact_endpoint(x, 80.0, rtol=1e-8)
    fine = digits.exact_endpoint(x, 80.0, rtol=1e-11)
    assert (coarse - fine).norm() / fine.norm() < 1e-6
    # The endpoint is a plausible digit: as far from its nearest class mean as true samples are.
    nearest = torch.cdist(fine.reshape(16, -1), digits.means).min(1).values
    real = torch.cdist(digits.sample(2000, torch.Generator().manual_seed(9)).reshape(2000, -1), digits.means).min(1).values
    assert abs(float(nearest.mean()) / float(real.mean()) - 1) < 0.25
