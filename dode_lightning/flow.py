"""Flow-matching networks as denoisers (learned_steps.md §2).

A flow network predicts the velocity v = ε − x₀ of x_t = (1 − t)·x₀ + t·ε at its own state x_t and time t. In the
package's σ-form the same state is the scaled state s·x_VE with s = 1 − t, σ = t/(1 − t), so a solver on a
`FlowMatching` schedule integrates x_t itself, and its first evaluation is at t = 1 (σ = ∞), where the VE state is
infinite but x_t = ε is not: such evaluations go through `flow_eps_and_denoised(x_t, t)`, never through x_VE.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .denoisers import broadcast_sigma
from .schedules import flow_time

__all__ = ["VelocityDenoiser", "MixtureVelocity", "ExactFlowMixture"]

VelocityModel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


class VelocityDenoiser(nn.Module):
    """A velocity model `velocity_model(x_t, t, class_labels) -> v` (t per sample, float64) as a denoiser.

    `flow_eps_and_denoised(x_t, t)` gives (ε̂, x̂₀) = (x_t + (1 − t)·v, x_t − t·v) from one evaluation, finite at
    t = 1; the package's VE interface `denoiser(x, σ)` (σ < ∞) maps x to x_t = x/(1 + σ) and returns x̂₀.
    """

    def __init__(self, velocity_model: VelocityModel) -> None:
        super().__init__()
        self.velocity_model = velocity_model

    def flow_eps_and_denoised(self, x_t: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        per_sample = t.expand(x_t.shape[0]) if t.ndim == 0 else t.reshape(-1)
        v = self.velocity_model(x_t, per_sample, class_labels).to(x_t.dtype)
        t_b = broadcast_sigma(per_sample, x_t)
        return x_t + (1 - t_b) * v, x_t - t_b * v

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ε̂, x̂₀) at the VE-form state x; at σ = ∞, x is the finite stand-in x_1 (see `denoisers.ve_form`)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        return self.flow_eps_and_denoised(flow_state(x, sigma), flow_time(sigma), class_labels)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        return self.eps_and_denoised(x, sigma, class_labels)[1]


def flow_state(x: Tensor, sigma: Tensor) -> Tensor:
    """x_t = x_VE/(1 + σ) of a VE-form state (σ scalar or per sample); at σ = ∞ x is already x_1 (`ve_form`)."""
    sigma_b = broadcast_sigma(sigma, x)
    return torch.where(torch.isinf(sigma_b), x, x / (1 + sigma_b))


class MixtureVelocity(nn.Module):
    """The exact velocity field of a `GaussianMixture` (its `velocity`), as a velocity model."""

    def __init__(self, mixture: nn.Module) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.mixture.velocity(x_t, t, class_labels)


class ExactFlowMixture(VelocityDenoiser):
    """The exact velocity field of a `GaussianMixture` as a flow denoiser, with the exact ODE solution for reference."""

    def __init__(self, mixture: nn.Module) -> None:
        super().__init__(MixtureVelocity(mixture))
        self.mixture = mixture

    def exact_endpoint(self, x: Tensor, sigma_start: float, class_labels: Tensor | None = None, *, sigma_end: float = 0.0) -> Tensor:
        """Exact ODE state in VE form at σ_end from the VE-form x at σ_start (at σ = ∞: x_1, `ve_form`), float64."""
        sigma = torch.tensor(sigma_start, dtype=torch.float64)
        end = self.mixture.flow_endpoint(flow_state(x.to(torch.float64), sigma), float(flow_time(sigma)), class_labels, t_end=float(flow_time(sigma_end)))
        return end * (1 + sigma_end)
