"""Multistep DPM-Solver++(2M/3M) (Lu et al. 2022, data prediction) and D-DPM-Solver++ [ext] (method.md §3.5).

With α = s, σ^vp = s·σ and ℓ = −log σ: h_k = log(σ_k/σ_{k+1}), σ^vp_{k+1}/σ^vp_k·x_k = s_{k+1}(σ_{k+1}/σ_k)·x_k/s_k
and b_k = α_{k+1}(1 − e^{−h_k}) = s_{k+1}(1 − σ_{k+1}/σ_k), the Euler/DDIM data coefficient.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import OneStagePerStep, register_solver
from .stages import Evaluate, Stage, StageGenerator

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
        orders.append(1 if bool(sigmas[k + 1] == 0) else q)
    return orders


def dpm_solver_pp_stages(x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, orders: list[int]) -> StageGenerator:
    """DPM-Solver++ multistep (2M: `solver_type="midpoint"`); step k uses order `orders[k]`.

    x̃_k = (σ^vp_{k+1}/σ^vp_k)·x_k + b_k·D̃_k with the combined estimate D̃_k of method.md §3.5 built from raw D's
    (finite from σ_0 = ∞, where h_0 = ∞ and the next step's ratio r = ∞ drops the difference term).
    D-DPM-Solver++: Δ_k = b_k(D̃_k − D̃_{k−1}); λ_0 ≡ 0 (no previous estimate). λ never touches the D history.
    """
    step = [torch.log(sigmas[k] / sigmas[k + 1]) for k in range(len(sigmas) - 1)]  # h_k, ∞ into σ = 0
    history: list[Tensor] = []
    d_tilde_prev = None
    for k, q in enumerate(orders):
        denoised = yield Evaluate(x, sigmas[k], scales[k])
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
            phi_1 = torch.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            d_tilde = denoised - (phi_2 / phi_1) * d1 + (phi_3 / phi_1) * d2
        coeff = scales[k + 1] * (1.0 - sigmas[k + 1] / sigmas[k])
        base = noise_scales[k + 1] / noise_scales[k] * x + coeff * d_tilde
        delta = None if d_tilde_prev is None else coeff * (d_tilde - d_tilde_prev)
        x = yield Stage(base, delta, coeff, sigmas[k], sigmas[k + 1])
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
        self,
        sigmas: Tensor,
        scales: Tensor | None = None,
        unit_prior: bool = False,
        lower_order_final_below: int = 15,
        noise_scales: Tensor | None = None,
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        self.orders = multistep_orders(self.sigmas, self.order, lower_order_final_below)

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """logSNR-uniform on [σ_min, σ_max] (no terminal 0) on VP schedules; Karras ρ = 7 + 0 otherwise (§3.5)."""
        if schedule.variance_preserving:
            return "logsnr_uniform", {"terminal_zero": False}
        return "karras", {}

    def stages(self, x: Tensor) -> StageGenerator:
        return dpm_solver_pp_stages(x, self.sigmas, self.scales, self.noise_scales, self.orders)


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
