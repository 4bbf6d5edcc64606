"""UniPC (Zhao et al. 2023), bh2 variant with data prediction, as a stage generator, and D-UniPC [ext].

With α = s, σ^vp = s·σ and log-SNR ℓ = −log σ, UniPC's updates divided by α_t read, in VE form,
x_t = (σ_t/σ_s)·x_s + (1 − σ_t/σ_s)·m_s − B(h)·Σ_i ρ_i·D1_i, B(h) = e^{−h} − 1 (bh2), D1_i = (m_{s_i} − m_s)/r_i,
r_i = (ℓ_{s_i} − ℓ_s)/h. Each evaluation m_k first corrects the state it was evaluated at (UniC, no extra
evaluation: it reuses the output the next predictor needs), then predicts the next state (UniP).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import OneStagePerStep, register_solver
from .dpm_solver_pp import DPMSolverPP
from .stages import Evaluate, Stage, StageGenerator

__all__ = ["unipc_orders", "unipc_coefficients", "unipc_stages", "UniPC", "UniPC2", "UniPC3"]


def unipc_orders(sigmas: Tensor, order: int, lower_order_final: bool = True) -> list[int]:
    """Order of the predictor of step k: min(order, k + 1) (warm-up), with `lower_order_final` also ≤ N − k
    (diffusers' rule, for every N), and 1 into σ = 0."""
    steps = len(sigmas) - 1
    orders = []
    for k in range(steps):
        q = min(order, k + 1, steps - k) if lower_order_final else min(order, k + 1)
        orders.append(1 if bool(sigmas[k + 1] == 0) else q)
    return orders


def unipc_coefficients(rks: list[Tensor], h: Tensor, order: int, corrector: bool) -> tuple[list[Tensor], Tensor]:
    """ρ and B(h) of a bh2 step of this order with log-SNR ratios `rks` of the earlier outputs (0-d tensors).

    Solves Σ_i ρ_i r_i^{p−1} = φ_p-terms·p!/B(h), p = 1 … order (the UniPC order conditions); the predictor uses
    the first order − 1 conditions (ρ = 1/2 at order 2), the corrector all of them including the new output
    (r = 1; ρ = 1/2 at order 1).
    """
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    nodes = [*rks, torch.ones_like(h)]
    conditions, rhs = [], []
    factorial = 1
    for i in range(1, order + 1):
        conditions.append(torch.stack([r ** (i - 1) for r in nodes]))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    half = torch.full_like(h, 0.5)
    if corrector:
        if order == 1:
            return [half], b_h
        matrix, vector = torch.stack(conditions), torch.stack(rhs)
    else:
        if order == 1:
            return [], b_h
        if order == 2:
            return [half], b_h
        matrix, vector = torch.stack(conditions)[:-1, :-1], torch.stack(rhs[:-1])
    return list(torch.linalg.solve(matrix, vector)), b_h


def unipc_stages(x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, orders: list[int]) -> StageGenerator:
    """UniPC-bh2 multistep (`predict_x0`); step k predicts with order `orders[k]`, and the corrector of the state
    it produced uses the same order.

    Stages are the corrected states, where the trajectory lives: stage 0 is x_T itself (σ_0), stage k ≥ 1 the
    UniC-corrected state at σ_k after the evaluation at the predicted one, and a last stage, without evaluation,
    the final prediction at σ_N. D-UniPC: stage k ≥ 1 gets Δ_k = b_k(m_k − m_{k−1}) with b_k = s_k·B(h)·ρ_k, the
    corrector's weight on the new output m_k, the final prediction Δ_N = b_N(m_{N−1} − m_{N−2}) with its data
    coefficient b_N = s_N(1 − σ_N/σ_{N−1}); λ_0 ≡ 0. Each predictor starts from the λ-corrected state.
    """
    logsnr = -torch.log(sigmas)
    outputs: list[Tensor] = []  # data predictions m_0 … m_{k−1}

    def update(x_start: Tensor, s: int, t: int, m_new: Tensor | None, order: int) -> tuple[Tensor, Tensor]:
        """UniP (m_new None) or UniC (m_new the output at t) from the state x_start at node s, whose output is
        outputs[s]; also the weight of m_new in the result."""
        m0 = outputs[s]
        if bool(sigmas[t] == 0):
            return scales[t] * m0, torch.zeros_like(sigmas[t])  # first order into σ = 0: the data prediction itself
        h = logsnr[t] - logsnr[s]
        # An output at σ = ∞ (flow matching's first) is infinitely far in log-SNR: its weight in the polynomial
        # vanishes (r → ∞), so it drops out and the step's order falls by one.
        earlier = [s - i for i in range(1, order) if bool(torch.isfinite(logsnr[s - i]))]
        order = len(earlier) + 1
        rks = [(logsnr[j] - logsnr[s]) / h for j in earlier]
        rhos, b_h = unipc_coefficients(rks, h, order, corrector=m_new is not None)
        residual = sum((rho * (outputs[j] - m0) / r for rho, j, r in zip(rhos, earlier, rks)), torch.zeros_like(m0))
        weight = torch.zeros_like(h)
        if m_new is not None:
            residual = residual + rhos[-1] * (m_new - m0)
            weight = -scales[t] * b_h * rhos[-1]
        # α_t/α_s·x_s·e^{−h} = (β_t/β_s)·x_s and α_t(1 − e^{−h}) = α_t(1 − σ_t/σ_s): finite from σ_s = ∞
        return noise_scales[t] / noise_scales[s] * x_start + scales[t] * ((1.0 - sigmas[t] / sigmas[s]) * m0 - b_h * residual), weight

    x_pred = x
    for k in range(len(orders)):
        denoised = yield Evaluate(x_pred, sigmas[k], scales[k])
        if k == 0:
            corrected, delta, coeff = x_pred, None, torch.zeros_like(sigmas[0])
        else:
            corrected, coeff = update(start, k - 1, k, denoised, orders[k - 1])
            delta = coeff * (denoised - outputs[-1])
        outputs.append(denoised)
        start = yield Stage(corrected, delta, coeff, sigmas[k], sigmas[k])
        x_pred, _ = update(start, k, k + 1, None, orders[k])
    coeff = scales[-1] * (1.0 - sigmas[-1] / sigmas[-2])  # the final prediction's weight on m_{N−1} (1 into σ = 0)
    delta = None if len(outputs) < 2 else coeff * (outputs[-1] - outputs[-2])
    x = yield Stage(x_pred, delta, coeff, sigmas[-2], sigmas[-1])
    return x


class UniPC(OneStagePerStep):
    """UniPC-bh2 / D-UniPC (data prediction) of a fixed order; NFE = steps ≥ 1, N + 1 stages (see unipc_stages)."""

    prediction: ClassVar[str] = "data"
    order: ClassVar[int]
    # The same default grid as DPM-Solver++ (both are multistep exponential integrators in log-SNR).
    default_grid = classmethod(DPMSolverPP.default_grid.__func__)

    def __init__(
        self,
        sigmas: Tensor,
        scales: Tensor | None = None,
        unit_prior: bool = False,
        lower_order_final: bool = True,
        noise_scales: Tensor | None = None,
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        self.orders = unipc_orders(self.sigmas, self.order, lower_order_final)

    @property
    def target_sigmas(self) -> Tensor:
        return self.sigmas.clone()  # x_T, the corrected states at σ_1 … σ_{N−1}, the final prediction

    @property
    def lambda_fitted(self) -> list[bool]:
        return [k > 0 and self.nfe > 1 for k in range(self.nfe + 1)]

    def stages(self, x: Tensor) -> StageGenerator:
        return unipc_stages(x, self.sigmas, self.scales, self.noise_scales, self.orders)


@register_solver
class UniPC2(UniPC):
    """UniPC-bh2, order 2 (diffusers' default for guided sampling)."""

    name = "unipc_2"
    order = 2


@register_solver
class UniPC3(UniPC):
    """UniPC-bh2, order 3 (diffusers' default `solver_order`)."""

    name = "unipc_3"
    order = 3
