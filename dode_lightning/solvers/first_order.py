"""DDIM (noise or data prediction, = Euler on the EDM ODE) and EDM's Heun, as stage generators."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..denoisers import Denoiser, eps_and_denoised
from ..schedules import Schedule
from .base import NFEError, OneStagePerStep, Solver, register_solver
from .stages import Stage, StageGenerator

__all__ = ["ddim_stages", "heun_stages", "DDIM", "Euler", "Heun"]


def ddim_stages(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    scales: Tensor,
    prediction: str = "noise",
    class_labels: Tensor | None = None,
) -> StageGenerator:
    """DDIM with η = 0 on states x = s·(x₀ + σn); one stage per σ_k → σ_{k+1} (method.md §3.1, §3.6).

    Update (the same for both predictions): x̃ = s_{k+1}·(x/s_k + (σ_{k+1} − σ_k)·ε̂), with ε̂ the network's own ε
    for ε-networks and ε̂ = (x/s_k − D)/σ_k for x₀-networks (`eps_and_denoised`).
    `prediction="noise"`: d̂ = ε̂, b = s_{k+1}(σ_{k+1} − σ_k), ε̂_{−1} := x_T (λ_0 fitted, official noise side).
    `prediction="data"`: d̂ = D, b = s_{k+1}(1 − σ_{k+1}/σ_k), λ_0 ≡ 0 (official EDM side).
    """
    if prediction not in ("noise", "data"):
        raise ValueError(f"prediction must be 'noise' or 'data', got {prediction!r}")
    d_prev = x if prediction == "noise" else None
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        scale, scale_next = float(scales[k]), float(scales[k + 1])
        x_ve = x / scale
        eps, denoised = eps_and_denoised(denoiser, x_ve, sigma, class_labels)
        base = scale_next * (x_ve + (sigma_next - sigma) * eps)
        if prediction == "noise":
            d_hat, coeff = eps, scale_next * (sigma_next - sigma)
        else:
            d_hat, coeff = denoised, scale_next * (1.0 - sigma_next / sigma)
        delta = None if d_prev is None else coeff * (d_hat - d_prev)
        x = yield Stage(base, delta, coeff, sigma, sigma_next)
        d_prev = d_hat
    return x


def heun_stages(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, class_labels: Tensor | None = None, scales: Tensor | None = None
) -> StageGenerator:
    """EDM Algorithm 2 (S_churn = 0) on the VE-form ODE; 2N − 1 stages, the last step Euler (method.md §3.7).

    Predictor stage 2i: Δ = p_i(D_i − D′_i) with p_i = 1 − t_{i+1}/t_i, D′_i the previous corrector evaluation
    (λ_0 ≡ 0). Corrector stage 2i+1 is evaluated at the λ-corrected predictor: Δ = c_i(D′_{i+1} − D_i),
    c_i = (t_i − t_{i+1})/(2t_{i+1}). With `scales` (a teacher for a VP-state student) states are s·x_VE: the
    same integration, read and written in the student's scaled form.
    """
    sc = [1.0] * len(sigmas) if scales is None else [float(v) for v in scales]
    d_corrector = None
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        x_ve = x / sc[i]
        denoised = denoiser(x_ve, t, class_labels).to(x.dtype)
        slope = (x_ve - denoised) / t
        predictor_coeff = 1.0 - t_next / t
        delta = None if d_corrector is None else sc[i + 1] * predictor_coeff * (denoised - d_corrector)
        stage = Stage(sc[i + 1] * (x_ve + (t_next - t) * slope), delta, sc[i + 1] * predictor_coeff, t, t_next)
        x_pred = yield stage
        if t_next == 0:
            return x_pred
        x_pred_ve = x_pred / sc[i + 1]
        d_corrector = denoiser(x_pred_ve, t_next, class_labels).to(x.dtype)
        slope_next = (x_pred_ve - d_corrector) / t_next
        corrector_coeff = sc[i + 1] * (t - t_next) / (2 * t_next)
        base = sc[i + 1] * (x_ve + (t_next - t) * (0.5 * slope + 0.5 * slope_next))
        x = yield Stage(base, corrector_coeff * (d_corrector - denoised), corrector_coeff, t_next, t_next)
    return x


class _DDIM(OneStagePerStep):
    """DDIM on the schedule's own states; NFE = number of steps."""

    prediction: ClassVar[str]

    def stages(self, denoiser: Denoiser, x: Tensor, class_labels: Tensor | None = None) -> StageGenerator:
        return ddim_stages(denoiser, x, self.sigmas, self.scales, self.prediction, class_labels)


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
    """EDM Heun (Algorithm 2, S_churn = 0), D-EDM (method.md §3.7); integrates the VE-form ODE on any grid."""

    name = "heun"
    prediction = "data"

    @classmethod
    def from_grid(cls, sigmas: Tensor, schedule: Schedule) -> "Heun":
        return cls(sigmas)

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        if nfe < 1 or nfe % 2 == 0:
            nearest = "use 1" if nfe < 1 else f"use {nfe - 1} or {nfe + 1}"
            raise NFEError(f"heun makes 2N − 1 evaluations (N steps, last one Euler): NFE must be odd and ≥ 1, got {nfe}; {nearest}")
        return (nfe + 1) // 2

    @property
    def nfe(self) -> int:
        return sum(2 if float(s) > 0 else 1 for s in self.sigmas[1:])

    @property
    def target_sigmas(self) -> Tensor:
        return torch.stack([s for s in self.sigmas[1:] for _ in range(2 if float(s) > 0 else 1)])

    @property
    def lambda_fitted(self) -> list[bool]:
        return [k > 0 for k in range(self.nfe)]

    @property
    def step_ends(self) -> list[bool]:
        # Stage 2i is the predictor (an Euler estimate), 2i + 1 the corrector; the final Euler step has no corrector.
        return [k % 2 == 1 or (k == self.nfe - 1 and float(self.sigmas[-1]) == 0) for k in range(self.nfe)]

    def stages(self, denoiser: Denoiser, x: Tensor, class_labels: Tensor | None = None) -> StageGenerator:
        return heun_stages(denoiser, x, self.sigmas, class_labels, self.scales)
