"""DDIM (noise or data prediction, = Euler on the EDM ODE) and EDM's Heun, as stage generators."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import NFEError, OneStagePerStep, Solver, register_solver
from .stages import Evaluate, Stage, StageGenerator

__all__ = ["ddim_stages", "heun_stages", "DDIM", "Euler", "Heun"]


def ddim_stages(
    x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, prediction: str = "noise"
) -> StageGenerator:
    """DDIM with η = 0 on states x = α·x₀ + β·n, α = s, β = s·σ; one stage per σ_k → σ_{k+1} (method.md §3.1, §3.6).

    Update (the same for both predictions, the official α-form): x̃ = α_{k+1}·x̂₀ + β_{k+1}·ε̂ from one evaluation
    (ε̂ the network's own ε for ε-networks, (x/s_k − D)/σ_k for x₀-networks; finite where σ_k = ∞ when the
    denoiser answers there). `prediction="noise"`: d̂ = ε̂, b = s_{k+1}(σ_{k+1} − σ_k), ε̂_{−1} := x_T (λ_0 fitted,
    official noise side). `prediction="data"`: d̂ = D, b = s_{k+1}(1 − σ_{k+1}/σ_k), λ_0 ≡ 0 (official EDM side).
    """
    if prediction not in ("noise", "data"):
        raise ValueError(f"prediction must be 'noise' or 'data', got {prediction!r}")
    d_prev = x if prediction == "noise" and not bool(torch.isinf(sigmas[0])) else None  # no Δ_0 from σ = ∞
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        eps, denoised = yield Evaluate(x, sigma, scales[k], eps=True)
        base = scales[k + 1] * denoised + noise_scales[k + 1] * eps
        if prediction == "noise":
            d_hat, coeff = eps, scales[k + 1] * (sigma_next - sigma)
        else:
            d_hat, coeff = denoised, scales[k + 1] * (1.0 - sigma_next / sigma)
        delta = None if d_prev is None else coeff * (d_hat - d_prev)
        x = yield Stage(base, delta, coeff, sigma, sigma_next)
        d_prev = d_hat
    return x


def heun_stages(x: Tensor, sigmas: Tensor, scales: Tensor | None = None, noise_scales: Tensor | None = None, flow: bool = False) -> StageGenerator:
    """EDM Algorithm 2 (S_churn = 0) on the VE-form ODE; 2N − 1 stages, the last step Euler (method.md §3.7).

    Predictor stage 2i: Δ = p_i(D_i − D′_i) with p_i = 1 − t_{i+1}/t_i, D′_i the previous corrector evaluation
    (λ_0 ≡ 0). Corrector stage 2i+1 is evaluated at the λ-corrected predictor: Δ = c_i(D′_{i+1} − D_i),
    c_i = (t_i − t_{i+1})/(2t_{i+1}). With `scales` (a teacher for a VP-state student) states are s·x_VE: the
    same integration, read and written in the student's scaled form.

    `flow`: the same trapezoid in flow coordinates instead, the time τ = β/(α + β) = σ/(1 + σ) and the state
    y = x/(α + β) = x_VE/(1 + σ), whose ODE dy/dτ = (y − D)/τ has the VE form (= diffusers'
    FlowMatchHeunDiscreteScheduler on a flow model, where y = x_t and τ = t). The VE form is undefined from σ = ∞;
    the flow form starts there with τ = 1 (α = 0, β = 1, y = x).
    """
    sc = torch.ones_like(sigmas) if scales is None else scales
    if flow:
        mult = sc + noise_scales  # α + β = s(1 + σ), 1 at σ = ∞
        times = noise_scales / mult
    else:
        mult, times = sc, sigmas
    d_corrector = None
    for i in range(len(sigmas) - 1):
        t, t_next = times[i], times[i + 1]
        y = x / mult[i]
        denoised = yield Evaluate(x, sigmas[i], sc[i])
        slope = (y - denoised) / t
        predictor_coeff = 1.0 - t_next / t
        delta = None if d_corrector is None else mult[i + 1] * predictor_coeff * (denoised - d_corrector)
        stage = Stage(mult[i + 1] * (y + (t_next - t) * slope), delta, mult[i + 1] * predictor_coeff, sigmas[i], sigmas[i + 1])
        x_pred = yield stage
        if bool(sigmas[i + 1] == 0):
            return x_pred
        y_pred = x_pred / mult[i + 1]
        d_corrector = yield Evaluate(x_pred, sigmas[i + 1], sc[i + 1])
        slope_next = (y_pred - d_corrector) / t_next
        corrector_coeff = mult[i + 1] * (t - t_next) / (2 * t_next)
        base = mult[i + 1] * (y + (t_next - t) * (0.5 * slope + 0.5 * slope_next))
        x = yield Stage(base, corrector_coeff * (d_corrector - denoised), corrector_coeff, sigmas[i + 1], sigmas[i + 1])
    return x


class _DDIM(OneStagePerStep):
    """DDIM on the schedule's own states; NFE = number of steps."""

    prediction: ClassVar[str]

    def stages(self, x: Tensor) -> StageGenerator:
        return ddim_stages(x, self.sigmas, self.scales, self.noise_scales, self.prediction)


@register_solver
class DDIM(_DDIM):
    """DDIM on ε (noise prediction), D-DDIM of the noise side (method.md §3.1)."""

    name = "ddim"
    prediction = "noise"
    first_lambda_fitted = True  # ε̂_{−1} := x_T (official noise side)


@register_solver
class Euler(_DDIM):
    """DDIM on x₀ = Euler on the EDM ODE, D-DDIM of the data side (method.md §3.6)."""

    name = "euler"
    prediction = "data"
    first_lambda_fitted = False


@register_solver
class Heun(Solver):
    """EDM Heun (Algorithm 2, S_churn = 0), D-EDM (method.md §3.7); integrates the VE-form ODE on any grid that
    starts at a finite σ, and the flow-form ODE (`heun_stages` with `flow`) on grids from σ = ∞ (flow matching)."""

    name = "heun"
    prediction = "data"

    @classmethod
    def from_grid(cls, sigmas: Tensor, schedule: Schedule) -> "Heun":
        if bool(torch.isinf(sigmas[0])):  # flow matching from t = 1: the schedule's own states x_t
            return cls(sigmas, schedule.scale(sigmas), noise_scales=schedule.noise_scale(sigmas))
        return cls(sigmas)

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        if nfe < 1 or nfe % 2 == 0:
            nearest = "use 1" if nfe < 1 else f"use {nfe - 1} or {nfe + 1}"
            raise NFEError(f"heun makes 2N − 1 evaluations (N steps, last one Euler): NFE must be odd and ≥ 1, got {nfe}; {nearest}")
        return (nfe + 1) // 2

    @property
    def nfe(self) -> int:
        return sum(2 if bool(s > 0) else 1 for s in self.sigmas[1:])

    @property
    def target_sigmas(self) -> Tensor:
        return torch.stack([s for s in self.sigmas[1:] for _ in range(2 if bool(s > 0) else 1)])

    @property
    def lambda_fitted(self) -> list[bool]:
        return [k > 0 for k in range(self.nfe)]

    @property
    def step_ends(self) -> list[bool]:
        # Stage 2i is the predictor (an Euler estimate), 2i + 1 the corrector; the final Euler step has no corrector.
        return [k % 2 == 1 or (k == self.nfe - 1 and bool(self.sigmas[-1] == 0)) for k in range(self.nfe)]

    def stages(self, x: Tensor) -> StageGenerator:
        return heun_stages(x, self.sigmas, self.scales, self.noise_scales, flow=bool(torch.isinf(self.sigmas[0])))
