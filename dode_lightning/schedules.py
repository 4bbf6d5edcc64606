"""Noise schedules in σ-form: a state at time t is x = s(t)·(x₀ + σ(t)·n).

Every schedule maps a time t to a noise level σ(t) and back; the scale s depends on σ alone
(VP: s = 1/√(1+σ²), VE and EDM: s = 1), so solvers only ever need (σ, s) pairs.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPDiscrete",
    "VPContinuous",
    "VE",
    "EDM",
    "FlowMatching",
    "flow_time_shift",
    "dynamic_shift_mu",
    "flow_time",
    "linear_betas",
    "cosine_betas",
    "make_schedule",
]


Times = TypeVar("Times", Tensor, np.ndarray)


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A map between time t and noise level σ, plus the scale s(σ) of the state."""

    variance_preserving: bool = False
    own_grid: str | None = None
    """The grid `make_solver` uses when none is named (None: each solver's default)."""
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

    def noise_scale(self, sigma: Tensor | float) -> Tensor:
        """β(σ) = s(σ)·σ, the weight of the unit noise in the scaled state s·(x₀ + σn) (→ 1 as σ → ∞ on VP
        schedules, where s → 0)."""
        sigma = _f64(sigma)
        noise = self.scale(sigma) * sigma
        if self.variance_preserving:
            return torch.where(torch.isinf(sigma), torch.ones_like(sigma), noise)
        return noise

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


TIME_SHIFT_TYPES = ("exponential", "linear")


def flow_time_shift(t: Times, shift: float = 1.0, mu: float | None = None, time_shift_type: str = "exponential") -> Times:
    """diffusers' flow-matching time shift of times t ∈ (0, 1] (FlowMatchEulerDiscreteScheduler).

    Static (`mu` None): t' = shift·t / (1 + (shift − 1)·t) (SD3: shift 3). Dynamic (resolution-dependent, FLUX):
    exponential t' = e^μ / (e^μ + (1/t − 1)), linear t' = μ / (μ + (1/t − 1)). Exponential with μ = log(shift)
    equals the static shift. Computed in t's own type and precision (a tensor or a numpy array), as diffusers does.
    """
    if mu is None:
        return shift * t / (1 + (shift - 1) * t)
    odds = 1 / t - 1
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    return mu / (mu + odds)


def dynamic_shift_mu(
    image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """μ of the dynamic shift as the FLUX/SD3 pipelines compute it: linear in the image token count."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def flow_time(sigma: Tensor | float) -> Tensor:
    """Flow time t = σ/(1 + σ) of a noise level (float64), 1 at σ = ∞."""
    sigma = _f64(sigma)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


class FlowMatching(Schedule):
    """Rectified flow x_t = (1 − t)·x₀ + t·ε in σ-form: σ = t/(1 − t), s = 1 − t = 1/(1 + σ), β = s·σ = t.

    The time t ∈ [0, 1] is the network's own time (its input is t·num_train_timesteps); t = 1 is σ = ∞, where the
    state is pure noise (s = 0, β = 1). The time shift (`shift`, or `mu` with `time_shift_type` for the dynamic,
    resolution-dependent shift) belongs to the step grid, `own_grid` ("flow": the scheduler's spacing; "flux":
    FluxPipeline's), but is part of the schedule so that λ fitted at one shift are refused at another.
    """

    own_grid = "flow"

    def __init__(
        self, shift: float = 1.0, mu: float | None = None, time_shift_type: str = "exponential", num_train_timesteps: int = 1000, own_grid: str = "flow"
    ) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift <= 100:
            raise ValueError(f"the flow time shift must be a number in (0, 100] (SD3 uses 3.0), got {shift!r}")
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
            raise ValueError(f"the dynamic shift mu must be a finite number (FLUX: from the image size), got {mu!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {time_shift_type!r}")
        if mu is not None and shift != 1:
            raise ValueError(f"give either a static shift ({shift!r}) or a dynamic shift mu ({mu!r}), not both")
        if mu is not None and time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"the linear dynamic shift needs mu > 0, got {mu!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer ≥ 2, got {num_train_timesteps!r}")
        if own_grid not in ("flow", "flux"):
            raise ValueError(f"a flow schedule's own grid is 'flow' (diffusers' scheduler) or 'flux' (FluxPipeline), got {own_grid!r}")
        self.own_grid = own_grid
        self.shift = float(shift)
        self.mu = None if mu is None else float(mu)
        self.time_shift_type = time_shift_type
        self.num_train_timesteps = num_train_timesteps
        self.t_min, self.t_max = 1.0 / num_train_timesteps, 1.0

    @property
    def time_shift(self) -> dict[str, float | str | None]:
        """The time shift as recorded in a λ file (`shift`, or `mu` with its `time_shift_type`)."""
        if self.mu is None:
            return {"shift": self.shift}
        return {"mu": self.mu, "time_shift_type": self.time_shift_type}

    def shifted(self, t: Times) -> Times:
        """Grid time t → the time the network is evaluated at (`flow_time_shift` with this schedule's shift)."""
        return flow_time_shift(t, self.shift, self.mu, self.time_shift_type)

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _f64(t)
        return t / (1 - t)  # t = 1 → +∞

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        return flow_time(sigma)

    def scale(self, sigma: Tensor | float) -> Tensor:
        return 1 / (1 + _f64(sigma))

    def noise_scale(self, sigma: Tensor | float) -> Tensor:
        return self.sigma_inv(sigma)  # β = σ/(1 + σ) = t, finite (1) at σ = ∞

    def prior(self, noise: Tensor, sigma_max: float) -> Tensor:
        """x_t at t = 1 is the noise itself."""
        return noise


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name: `vp_linear`, `vp_cosine`, `vp_continuous`, `ve`, `edm`, `flow`."""
    if name == "vp_linear":
        return VPDiscrete(linear_betas(int(kwargs.pop("num_timesteps", 1000)), **kwargs))
    if name == "vp_cosine":
        return VPDiscrete(cosine_betas(int(kwargs.pop("num_timesteps", 1000)), **kwargs))
    builders = {"vp_continuous": VPContinuous, "ve": VE, "edm": EDM, "flow": FlowMatching}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of vp_linear, vp_cosine, vp_continuous, ve, edm, flow")
    return builders[name](**kwargs)
