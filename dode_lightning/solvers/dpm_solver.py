"""Singlestep DPM-Solver-2/3 (Lu et al. 2022, noise prediction) and D-DPM-Solver as stage generators (method.md §3.4).

In the DPM-Solver notation α_u = s_u, σ^vp_u = s_u·σ_u and ℓ_u = −log σ_u, so every term σ^vp_u·(e^{ℓ_u − ℓ_s} − 1)
of the paper's updates equals s_u(σ_s − σ_u); the updates below are the paper's, written with that identity.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import OneStagePerStep, register_solver
from .stages import Evaluate, Stage, StageGenerator

__all__ = ["singlestep_orders", "dpm_solver_stages", "DPMSolver", "DPMSolver2", "DPMSolver3"]


def singlestep_orders(nfe: int, order: int) -> list[int]:
    """Orders of the outer steps for a given NFE [official `get_orders_and_timesteps_for_singlestep_solver`].

    Order 3: NFE ≡ 0 (mod 3) → [3]·(K−2) + [2, 1]; ≡ 1 → [3]·(K−1) + [1]; ≡ 2 → [3]·(K−1) + [2], K = NFE//3 + 1.
    Order 2: [2]·(NFE//2), plus [1] when NFE is odd. Order 1: [1]·NFE.
    """
    if order == 3:
        k = nfe // 3 + 1
        return [3] * (k - 2) + [2, 1] if nfe % 3 == 0 else [3] * (k - 1) + [nfe % 3]
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    if order == 1:
        return [1] * nfe
    raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")


def dpm_solver_stages(x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, orders: list[int]) -> StageGenerator:
    """Singlestep DPM-Solver (`solver_type="dpmsolver"`) on the node grid `sigmas`; one stage per evaluation.

    An outer step s → t of order q spans q node intervals; its inner nodes s₁ (, s₂) are the grid points inside it,
    and evaluation j produces the state at node j + 1. With h = ℓ_t − ℓ_s and r_m = (ℓ_{s_m} − ℓ_s)/h, each stage's
    Δ is its coefficient times (fresh ε − the evaluation just before it); ε_prev := x_T at the first step [official].
    Inside an outer step every update starts from the outer-step start state x, so λ_a reaches x_t only through the
    point where ε_{s₁} is evaluated (method.md §3.4).
    """
    if sum(orders) != len(sigmas) - 1:
        raise ValueError(f"orders {orders} need {sum(orders) + 1} nodes, got {len(sigmas)}")
    sig, sc = sigmas, scales

    def first_order(denoised_s: Tensor, eps_s: Tensor, u: int) -> Tensor:
        """α_u/α_s·x − σ^vp_u(e^{ℓ_u − ℓ_s} − 1)ε_s = α_u·x̂₀_s + β_u·ε_s, DDIM from node s to node u."""
        return sc[u] * denoised_s + noise_scales[u] * eps_s

    eps_prev = x
    s = 0
    for q in orders:
        t = s + q
        eps_s, denoised_s = yield Evaluate(x, sig[s], sc[s], eps=True)
        coeff_a = sc[s + 1] * (sig[s + 1] - sig[s])  # −σ^vp_{s₁}φ₁₁ (φ₁ for q = 1)
        state = yield Stage(first_order(denoised_s, eps_s, s + 1), coeff_a * (eps_s - eps_prev), coeff_a, sig[s], sig[s + 1])
        eps_prev = eps_s
        if q > 1:
            h = torch.log(sig[s] / sig[t])
            r1 = torch.log(sig[s] / sig[s + 1]) / h
            eps_1, _ = yield Evaluate(state, sig[s + 1], sc[s + 1], eps=True)
            if q == 2:
                coeff_b = sc[t] * (sig[t] - sig[s]) / (2 * r1)  # −σ^vp_t φ₁/(2r₁)
                base = first_order(denoised_s, eps_s, t) + coeff_b * (eps_1 - eps_s)
                state = yield Stage(base, coeff_b * (eps_1 - eps_s), coeff_b, sig[s + 1], sig[t])
            else:
                r2 = torch.log(sig[s] / sig[s + 2]) / h
                phi_22 = sc[s + 2] * (sig[s] - sig[s + 2]) / (r2 * h) - noise_scales[s + 2]  # σ^vp_{s₂}φ₂₂
                coeff_b = -(r2 / r1) * phi_22
                base = first_order(denoised_s, eps_s, s + 2) + coeff_b * (eps_1 - eps_s)
                state = yield Stage(base, coeff_b * (eps_1 - eps_s), coeff_b, sig[s + 1], sig[s + 2])
                eps_2, _ = yield Evaluate(state, sig[s + 2], sc[s + 2], eps=True)
                phi_2 = sc[t] * (sig[s] - sig[t]) / h - noise_scales[t]  # σ^vp_t φ₂
                coeff_c = -phi_2 / r2
                base = first_order(denoised_s, eps_s, t) + coeff_c * (eps_2 - eps_s)
                state = yield Stage(base, coeff_c * (eps_2 - eps_1), coeff_c, sig[s + 2], sig[t])
                eps_1 = eps_2
            eps_prev = eps_1
        x, s = state, t
    return x


class DPMSolver(OneStagePerStep):
    """Singlestep DPM-Solver / D-DPM-Solver of a fixed order (noise prediction); NFE = Σ orders ≥ order.

    `sigmas` is the node grid (NFE + 1 values, every stage state lies on it). Every λ is fitted. A node at σ = 0
    is allowed only as the end of a final first-order step (h = ∞ degenerates the higher-order ratios).
    """

    prediction: ClassVar[str] = "noise"
    order: ClassVar[int]
    first_lambda_fitted = True

    def __init__(
        self,
        sigmas: Tensor,
        scales: Tensor | None = None,
        unit_prior: bool = False,
        orders: list[int] | None = None,
        noise_scales: Tensor | None = None,
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        if self.from_infinity:
            raise ValueError(
                f"{self.name} cannot start at σ = ∞ (flow matching's t = 1): its ε-form step from there has an infinite "
                "log-SNR step h; use dpm_solver_pp_2m, unipc_2 or euler, or a grid with a finite sigma_max"
            )
        self.orders = singlestep_orders(len(self.sigmas) - 1, self.order) if orders is None else list(orders)
        if sum(self.orders) != len(self.sigmas) - 1 or not all(1 <= q <= self.order for q in self.orders):
            raise ValueError(f"{self.name}: orders {self.orders} do not cover {len(self.sigmas) - 1} intervals with order ≤ {self.order}")
        zero_ok = len(self.sigmas) - 1 if self.orders[-1] == 1 else len(self.sigmas)
        if bool((self.sigmas[:zero_ok] <= 0).any()):
            raise ValueError(
                f"{self.name}: σ = 0 is only allowed at the end of a final first-order step (orders {self.orders}); "
                "build the grid with terminal_zero=False"
            )

    @classmethod
    def teacher(
        cls, sigmas: Tensor, scales: Tensor | None, unit_prior: bool, segments: list[int], noise_scales: Tensor | None = None
    ) -> "DPMSolver":
        """Outer steps that never straddle a student knot: the official order rule within each segment."""
        orders = [q for n in segments for q in singlestep_orders(n, cls.order)]
        return cls(sigmas, scales, unit_prior, orders=orders, noise_scales=noise_scales)

    @property
    def step_ends(self) -> list[bool]:
        ends = [False] * self.nfe
        position = 0
        for q in self.orders:
            position += q
            ends[position - 1] = True
        return ends

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """Time-uniform nodes ending at t_min (official `time_uniform`, t ∈ [1/T, 1]); logSNR-uniform on EDM/VE."""
        uniform_time = schedule.variance_preserving
        return ("time_uniform" if uniform_time else "logsnr_uniform"), {"terminal_zero": False}

    def stages(self, x: Tensor) -> StageGenerator:
        return dpm_solver_stages(x, self.sigmas, self.scales, self.noise_scales, self.orders)


@register_solver
class DPMSolver2(DPMSolver):
    """Singlestep DPM-Solver-2 (the official launch script's order)."""

    name = "dpm_solver_2"
    order = min_nfe = 2


@register_solver
class DPMSolver3(DPMSolver):
    """Singlestep DPM-Solver-3 (the order the paper reports)."""

    name = "dpm_solver_3"
    order = min_nfe = 3

