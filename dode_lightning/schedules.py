"""Noise schedules in σ-form: a state at time t is x = s(t)·(x₀ + σ(t)·n).

Every schedule maps a time t to a noise level σ(t) and back; the scale s depends on σ alone
(VP: s = 1/√(1+σ²), VE and EDM: s = 1), so solvers only ever need (σ, s) pairs.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPDiscrete",
    "VPContinuous",
    "VE",
    "EDM",
    "linear_betas",
    "cosine_betas",
    "make_schedule",
]


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A map between time t and noise level σ, plus the scale s(σ) of the state."""

    variance_preserving: bool = False
    t_max: float
    t_min: float

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor:
        """σ(t), float64."""

    @abstractmethod
    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """t(σ), float64."""

    def scale(self, sigma: Tensor | float) -> Tensor:
        """s(σ): 1/√(1+σ²) for VP schedules, 1 otherwise."""
        sigma = _f64(sigma)
        if self.variance_preserving:
            return 1.0 / torch.sqrt(1.0 + sigma**2)
        return torch.ones_like(sigma)

    def prior(self, noise: Tensor, sigma_max: float) -> Tensor:
        """Initial state for unit Gaussian `noise`: VP uses it as is (the official convention), VE/EDM scale by σ_max."""
        if self.variance_preserving:
            return noise
        return noise * sigma_max

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM linear β schedule (Ho et al.), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule: ᾱ(t) = cos²(π/2·(t/T + s)/(1 + s)), β clipped at max_beta."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alphas_cumprod = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


class VPDiscrete(Schedule):
    """Discrete-time VP (DDPM): ᾱ_n = ∏_{m≤n}(1 − β_m), n = 0…T−1, with ᾱ_{−1} := 1.

    Time is the (possibly fractional) DDPM timestep n ∈ [−1, T−1]; between integers log α = ½ log ᾱ is
    interpolated linearly, which is DPM-Solver's continuous-time extension (t_cont = (n+1)/T). n = −1 gives σ = 0.
    """

    variance_preserving = True

    def __init__(self, betas: Tensor) -> None:
        betas = _f64(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = len(betas)
        # Node n+1 of this table is timestep n; node 0 is the clean end ᾱ_{-1} = 1.
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(self.alphas_cumprod)])
        self.t_min = 0.0
        self.t_max = float(self.num_timesteps - 1)

    def _log_alpha_at(self, t: Tensor) -> Tensor:
        pos = (t + 1.0).clamp(0.0, float(self.num_timesteps))
        lo = pos.floor().clamp(max=self.num_timesteps - 1).long()
        frac = pos - lo
        table = self._log_alpha
        return torch.where(frac == 0, table[lo], table[lo] + frac * (table[(lo + 1).clamp(max=self.num_timesteps)] - table[lo]))

    def sigma(self, t: Tensor | float) -> Tensor:
        log_alpha = self._log_alpha_at(_f64(t))
        return torch.sqrt(torch.expm1(-2.0 * log_alpha) + 0.0)  # + 0.0 turns −0 into +0 at n = −1

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        log_alpha = -0.5 * torch.log1p(_f64(sigma) ** 2)
        # log α decreases with n: search the negated, increasing table.
        neg = -self._log_alpha
        pos = torch.searchsorted(neg, -log_alpha).clamp(1, self.num_timesteps)
        lo, hi = neg[pos - 1], neg[pos]
        frac = ((-log_alpha) - lo) / (hi - lo)
        return (pos - 1).to(torch.float64) + frac - 1.0


class VPContinuous(Schedule):
    """EDM's continuous VP: σ(t) = √(exp(½β_d t² + β_min t) − 1), t ∈ [ε_t, 1]."""

    variance_preserving = True

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5) -> None:
        self.beta_d, self.beta_min = beta_d, beta_min
        self.t_min, self.t_max = epsilon_t, 1.0

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _f64(t)
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        sigma = _f64(sigma)
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)) - self.beta_min) / self.beta_d


class VE(Schedule):
    """Variance exploding (EDM's VE form): σ(t) = √t, s = 1."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        self.t_min, self.t_max = sigma_min**2, sigma_max**2

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(_f64(t))

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        return _f64(sigma) ** 2


class EDM(Schedule):
    """EDM (Karras et al.): σ(t) = t, s = 1."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.t_min, self.t_max = sigma_min, sigma_max

    def sigma(self, t: Tensor | float) -> Tensor:
        return _f64(t).clone()

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        return _f64(sigma).clone()


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name: `vp_linear`, `vp_cosine`, `vp_continuous`, `ve`, `edm`."""
    if name == "vp_linear":
        return VPDiscrete(linear_betas(int(kwargs.pop("num_timesteps", 1000)), **kwargs))
    if name == "vp_cosine":
        return VPDiscrete(cosine_betas(int(kwargs.pop("num_timesteps", 1000)), **kwargs))
    builders = {"vp_continuous": VPContinuous, "ve": VE, "edm": EDM}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of vp_linear, vp_cosine, vp_continuous, ve, edm")
    return builders[name](**kwargs)
