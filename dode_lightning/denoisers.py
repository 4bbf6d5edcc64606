"""The one denoiser interface (k-diffusion / EDM contract) and adapters to it.

A denoiser is any callable `denoiser(x, sigma, class_labels=None) -> x0_hat` where `x` is the state in VE form
(x = x₀ + σ·n, unit scale; at σ = ∞ its finite stand-in, see `ve_form`), `sigma` is a scalar or a per-sample
tensor, and the result is the estimate of x₀.
Solvers for scaled (VP) states divide by s before calling and multiply back themselves.

A denoiser that wraps an ε-network may also offer `eps_and_denoised(x, sigma, class_labels) -> (ε̂, x̂₀)` from the
same single evaluation. ε-solvers ask for both through the function `eps_and_denoised`, so they get the network's
own ε: deriving it back from x̂₀ = x − σ·ε costs ~ulp(|x|)/σ in float32, which large λ amplify. Wrappers that only
pass a call through (counting, fixed batch shape, no-grad) forward it; wrappers that change x̂₀ (clipping) must
not, so the ε-solvers then see the changed x̂₀.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .schedules import VPDiscrete

__all__ = [
    "Denoiser",
    "eps_from_x0",
    "x0_from_eps",
    "eps_from_v",
    "broadcast_sigma",
    "ve_form",
    "eps_and_denoised",
    "DiscreteEpsDenoiser",
    "CountingDenoiser",
    "NoGradDenoiser",
    "FirstStepMean",
    "first_step_mean",
]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor: ...


def broadcast_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a tensor of x's dtype shaped (N, 1, …, 1) (or a 0-d tensor for a scalar σ)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def ve_form(x: Tensor, sigma: Tensor, scale: Tensor) -> Tensor:
    """The VE-form state x/s a denoiser is called with, for a scaled state x = s·x_VE at noise level σ (0-d).

    At σ = ∞ (flow matching's t = 1; s = 0, β = 1) x_VE is infinite; a denoiser is then called with its finite
    stand-in lim x_VE/σ = n, which is the scaled state x itself. Only flow denoisers (`flow.VelocityDenoiser`)
    evaluate there.
    """
    return x if bool(torch.isinf(sigma)) else x / scale


def eps_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """ε = (x − x₀)/σ for a VE-form state x (method.md §0.1 with α = 1); at σ = ∞, where x is `ve_form`'s stand-in
    lim x_VE/σ = n, ε is x itself."""
    sigma = broadcast_sigma(sigma, x)
    return torch.where(torch.isinf(sigma), x, (x - x0) / sigma)


def x0_from_eps(x: Tensor, sigma: Tensor | float, eps: Tensor) -> Tensor:
    """x₀ = x − σ·ε for a VE-form state x."""
    return x - broadcast_sigma(sigma, x) * eps


def eps_from_v(x_vp: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """ε from a v-prediction at VP state x_vp: ε = √ᾱ·v + √(1−ᾱ)·x_vp with √ᾱ = 1/√(1+σ²) (Salimans & Ho 2022)."""
    sigma = broadcast_sigma(sigma, x_vp)
    return (v + sigma * x_vp) / torch.sqrt(1.0 + sigma**2)


def eps_and_denoised(
    denoiser: Denoiser, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(ε̂, x̂₀) at (x, σ) from one evaluation, in x's dtype.

    The denoiser's own pair when it offers one (ε-networks: ε exact, x̂₀ = x − σ·ε); otherwise x̂₀ exact and
    ε̂ = (x − x̂₀)/σ (x₀-networks, and any wrapper that changes x̂₀).
    """
    native = getattr(denoiser, "eps_and_denoised", None)
    if native is not None:
        eps, denoised = native(x, sigma, class_labels)
        return eps.to(x.dtype), denoised.to(x.dtype)
    denoised = denoiser(x, sigma, class_labels).to(x.dtype)
    return eps_from_x0(x, sigma, denoised), denoised


EpsModel = Callable[..., Tensor]


class DiscreteEpsDenoiser(nn.Module):
    """Wraps a discrete-time ε-model `eps_model(x_vp, t[, class_labels])` as a VE-form denoiser.

    For a call at noise level σ the state is mapped to VP form, x_vp = x/√(1+σ²), and the model is called at the
    timestep t(σ) of the ᾱ table. σ off the trained grid: t(σ) is the fractional timestep from DPM-Solver's
    log-α interpolation; it is snapped to the nearest integer when within `snap` of one, rounded always when
    `integer_timesteps=True`, and clamped to [0, T−1] (noise levels beyond the trained range reuse the end
    timesteps). σ = 0 returns x unchanged. `time_shift` subtracts a constant from the model time (the iPNDM/DEIS
    official code calls the network at t − 1).
    """

    def __init__(
        self,
        eps_model: EpsModel,
        schedule: VPDiscrete,
        *,
        integer_timesteps: bool = False,
        time_shift: float = 0.0,
        snap: float = 1e-6,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.schedule = schedule
        self.integer_timesteps = integer_timesteps
        self.time_shift = time_shift
        self.snap = snap
        self.conditional = conditional

    def timestep(self, sigma: Tensor) -> Tensor:
        """Model time for noise level σ (float64)."""
        t = self.schedule.sigma_inv(sigma)
        nearest = t.round()
        t = torch.where((t - nearest).abs() < self.snap, nearest, t)
        if self.integer_timesteps:
            t = nearest
        return (t - self.time_shift).clamp(0.0, self.schedule.num_timesteps - 1)

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The network's ε̂ exactly as it returned it (cast to x's dtype) and x̂₀ = x − σ·ε̂ (x itself at σ = 0)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma_b = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
        t = self.timestep(sigma_b.cpu()).to(x.device)
        scale = broadcast_sigma((1.0 / torch.sqrt(1.0 + sigma_b**2)), x)
        t_model = t.long() if self.integer_timesteps else t.to(x.dtype)
        args = (x * scale, t_model) + ((class_labels,) if self.conditional else ())
        eps = self.eps_model(*args).to(x.dtype)
        x0 = x0_from_eps(x, sigma_b.to(x.dtype), eps)
        return eps, torch.where(broadcast_sigma(sigma_b, x) == 0, x, x0)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        return self.eps_and_denoised(x, sigma, class_labels)[1]


class CountingDenoiser:
    """Counts denoiser calls (network evaluations) and records the σ of each call."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0
        self.sigmas: list[Tensor] = []

    def _record(self, sigma: Tensor | float) -> None:
        self.calls += 1
        self.sigmas.append(torch.as_tensor(sigma).detach().clone())

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        self._record(sigma)
        return self.denoiser(x, sigma, class_labels)

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._record(sigma)
        return eps_and_denoised(self.denoiser, x, sigma, class_labels)


class NoGradDenoiser:
    """Evaluates a denoiser under `torch.no_grad()` (a frozen network never needs its graph), in both call forms."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return self.denoiser(x, sigma, class_labels)

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return eps_and_denoised(self.denoiser, x, sigma, class_labels)


class FirstStepMean(nn.Module):
    """A denoiser whose evaluations at the start σ_0 are answered by a calibrated constant x̂₀ (`model.first_step:
    mean`), every other one by the wrapped network: the analytical first step of AMED-Solver / GITS, with the batch
    mean of x̂₀(x_T; σ_0) instead of their zero.

    At σ_0 = σ_max the unconditional x̂₀ is the data mean plus a term of order Cov·x_T/σ_0² (0.008 RMS on the digits
    mixture at σ_0 = 80; exactly the mean from flow matching's σ = ∞), so the first of N + 1 network calls carries
    almost nothing a constant cannot: the student makes N calls per sample.
    """

    def __init__(self, denoiser: nn.Module, sigma_first: float, denoised: Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_first = float(sigma_first)
        self.register_buffer("denoised", denoised.detach().clone(), persistent=False)

    def _at_start(self, sigma: Tensor | float) -> bool:
        values = torch.as_tensor(sigma, dtype=torch.float64).detach().reshape(-1)
        return bool((values == self.sigma_first).all()) if len(values) else False

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        if self._at_start(sigma):
            return self.denoised.to(x.device, x.dtype).expand_as(x).clone()
        return self.denoiser(x, sigma, class_labels)

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._at_start(sigma):
            denoised = self.forward(x, sigma, class_labels)
            return eps_from_x0(x, sigma, denoised), denoised
        return eps_and_denoised(self.denoiser, x, sigma, class_labels)


def first_step_mean(denoiser: Denoiser, request_x: Tensor, sigma: Tensor, scale: Tensor) -> Tensor:
    """The constant of `FirstStepMean`: the mean over the batch of x̂₀ at the student's first evaluation request
    (state `request_x` = s·x_VE at σ_0), in float64; unconditional (a class's x̂₀ there is that class's mean)."""
    with torch.no_grad():
        return denoiser(ve_form(request_x, sigma, scale), sigma).to(torch.float64).mean(0)
