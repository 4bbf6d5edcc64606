"""Multistep DPM-Solver++(2M/3M) (Lu et al. 2022, data prediction) and D-DPM-Solver++ [ext] (method.md §3.5).

With α = s, σ^vp = s·σ and ℓ = −log σ: h_k = log(σ_k/σ_{k+1}), σ^vp_{k+1}/σ^vp_k·x_k = s_{k+1}(σ_{k+1}/σ_k)·x_k/s_k
and b_k = α_{k+1}(1 − e^{−h_k}) = s_{k+1}(1 − σ_{k+1}/σ_k), the Euler/DDIM data coefficient.
"""
from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from ..denoisers import Denoiser
from ..schedules import Schedule
from .base import OneStagePerStep, register_solver
from .stages import Stage, StageGenerator

__all__ = ["multistep_orders", "dpm_solver_pp_stages", "DPMSolverPP", "DPMSolverPP2M", "DPMSolverPP3M"]


def multistep_orders(sigmas: Tensor, order: int, lower_order_final_below: int) -> list[int]:
    """q_k = min(order, k + 1), lowered to min(q_k, N − k) when N < `lower_order_final_below`, and 1 for a step to
    σ = 0 (method.md §3.5; diffusers uses 15, the DPM-Solver reference sampler 10)."""
    steps = len(sigmas) - 1
    orders = []
    for k in range(steps):
        q = min(order, k + 1)
        if steps < lower_order_final_below:
            q = min(q, steps - k)
        orders.append(1 if float(sigmas[k + 1]) == 0 else q)
    return orders


def dpm_solver_pp_stages(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    scales: Tensor,
    orders: list[int],
    class_labels: Tensor | None = None,
) -> StageGenerator:
    """DPM-Solver++ multistep (2M: `solver_type="midpoint"`); step k uses order `orders[k]`.

    x̃_k = (σ^vp_{k+1}/σ^vp_k)·x_k + b_k·D̃_k with the combined estimate D̃_k of method.md §3.5 built from raw D's.
    D-DPM-Solver++: Δ_k = b_k(D̃_k − D̃_{k−1}); λ_0 ≡ 0 (no previous estimate). λ never touches the D history.
    """
    sig = [float(v) for v in sigmas]
    sc = [float(v) for v in scales]
    step = [math.log(sig[k] / sig[k + 1]) if sig[k + 1] > 0 else math.inf for k in range(len(sig) - 1)]
    history: list[Tensor] = []
    d_tilde_prev = None
    for k, q in enumerate(orders):
        x_ve = x / sc[k]
        denoised = denoiser(x_ve, sig[k], class_labels).to(x.dtype)
        history = [denoised, *history][:3]
        h = step[k]
        if q == 1:
            d_tilde = denoised
        elif q == 2:
            r = step[k - 1] / h
            d_tilde = denoised + (denoised - history[1]) / (2 * r)
        else:
            r0, r1 = step[k - 1] / h, step[k - 2] / h
            d1_0 = (denoised - history[1]) / r0
            d1_1 = (history[1] - history[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_1 = math.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            d_tilde = denoised - (phi_2 / phi_1) * d1 + (phi_3 / phi_1) * d2
        ratio = sig[k + 1] / sig[k]
        coeff = sc[k + 1] * (1.0 - ratio)
        base = sc[k + 1] * (ratio * x_ve + (1.0 - ratio) * d_tilde)
        delta = None if d_tilde_prev is None else coeff * (d_tilde - d_tilde_prev)
        x = yield Stage(base, delta, coeff, sig[k], sig[k + 1])
        d_tilde_prev = d_tilde
    return x


class DPMSolverPP(OneStagePerStep):
    """DPM-Solver++ multistep / D-DPM-Solver++ (data prediction) of a fixed order; NFE = steps ≥ order.

    `lower_order_final_below` (default 15, diffusers' rule; the DPM-Solver reference sampler uses 10; 0 disables)
    lowers the order of the last steps for small N. λ_0 ≡ 0, so N − 1 of the N λ's are fitted.
    """

    prediction: ClassVar[str] = "data"
    order: ClassVar[int]
    first_lambda_fitted = False

    def __init__(
        self, sigmas: Tensor, scales: Tensor | None = None, unit_prior: bool = False, lower_order_final_below: int = 15
    ) -> None:
        super().__init__(sigmas, scales, unit_prior)
        self.orders = multistep_orders(self.sigmas, self.order, lower_order_final_below)

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """logSNR-uniform on [σ_min, σ_max] (no terminal 0) on VP schedules; Karras ρ = 7 + 0 otherwise (§3.5)."""
        if schedule.variance_preserving:
            return "logsnr_uniform", {"terminal_zero": False}
        return "karras", {}

    def stages(self, denoiser: Denoiser, x: Tensor, class_labels: Tensor | None = None) -> StageGenerator:
        return dpm_solver_pp_stages(denoiser, x, self.sigmas, self.scales, self.orders, class_labels)


@register_solver
class DPMSolverPP2M(DPMSolverPP):
    """DPM-Solver++(2M), midpoint form."""

    name = "dpm_solver_pp_2m"
    order = min_nfe = 2


@register_solver
class DPMSolverPP3M(DPMSolverPP):
    """DPM-Solver++(3M)."""

    name = "dpm_solver_pp_3m"
    order = min_nfe = 3
