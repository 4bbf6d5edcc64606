"""tAB-DEIS (Zhang & Chen 2023) of orders 1–3 and D-DEIS as a stage generator (method.md §3.3).

On states x = s·(x₀ + σn) the probability-flow ODE is d(x/s) = ε dσ, so the exponential-integrator step is

    x̃_k = s_{k+1}·x_k/s_k + Σ_j κ_{kj} ε_{k−j},   κ_{kj} = s_{k+1} ∫_{σ_k}^{σ_{k+1}} L_{kj}(v(σ)) dσ,

with L_{kj} the Lagrange basis on the nodes v(σ_k), v(σ_{k−1}), …, v(σ_{k−q_k}), q_k = min(k, r). This is
method.md's κ rewritten with σ as the integration variable (√(ᾱ_{k+1}/ᾱ)·(−½ d log ᾱ/dτ)/√(1−ᾱ) dτ = s_{k+1} dσ).
The interpolation coordinate v is the schedule's time t (`basis="t"`, tAB-DEIS, the paper's solver) or log σ
(`basis="log_sigma"`, the log-ρ variant that diffusers' DEISMultistepScheduler implements in closed form).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from ..schedules import Schedule, VPDiscrete
from .base import OneStagePerStep, register_solver
from .stages import Evaluate, Stage, StageGenerator

__all__ = ["deis_coefficients", "deis_stages", "DEIS", "DEIS1", "DEIS2", "DEIS3"]

_GAUSS_POINTS = 16
_PIECES_SMOOTH = 8


def _lagrange_basis(v: Tensor, nodes: Sequence[Tensor], j: int) -> Tensor:
    """L_j(v) = Π_{m≠j} (v − v_m)/(v_j − v_m)."""
    out = torch.ones_like(v)
    for m, node in enumerate(nodes):
        if m != j:
            out = out * (v - node) / (nodes[j] - node)
    return out


def deis_coefficients(
    sigmas: Tensor,
    scales: Tensor,
    order: int,
    coordinate: Callable[[Tensor], Tensor],
    knots: Tensor | None = None,
    lower_order_final_below: int = 0,
) -> list[list[Tensor]]:
    """κ_{kj} for every step (list k of lists j = 0…q_k of 0-d float64 tensors, differentiable in σ).

    Quadrature [project]: composite 16-point Gauss–Legendre in σ; each step is split at `knots` (σ values where
    `coordinate` is not smooth, e.g. the integer timesteps of a discrete schedule), or into 8 equal pieces when
    there are none. [official] DEIS evaluates the integral with a 10,000-point left Riemann sum in t (error
    O(10⁻⁴) relative) and interpolates ᾱ linearly between integer timesteps where `VPDiscrete` interpolates log α;
    bit-level reproduction of the official coefficients would need both.
    Order q_k = min(k, order), lowered to min(q_k, N − 1 − k) when N < `lower_order_final_below`, and 0 for a step
    to σ = 0 in a coordinate that diverges there (κ_{k0} = b_k, the DDIM coefficient, is exact for q = 0).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    steps = len(sigmas) - 1
    nodes_gl, weights_gl = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(_GAUSS_POINTS))
    knots = torch.empty(0, dtype=torch.float64) if knots is None else torch.as_tensor(knots, dtype=torch.float64)
    coords = coordinate(sigmas)
    out: list[list[Tensor]] = []
    for k in range(steps):
        hi, lo = sigmas[k], sigmas[k + 1]
        q = min(k, order)
        if steps < lower_order_final_below:
            q = min(q, steps - 1 - k)
        if not bool(torch.isfinite(coords[k + 1])):
            q = 0
        coeff = scales[k + 1] * (lo - hi)  # b_k, the DDIM coefficient
        if q == 0:
            out.append([coeff])
            continue
        inner = knots[(knots > lo) & (knots < hi)].sort().values
        if len(inner):
            edges = torch.cat([lo.reshape(1), inner, hi.reshape(1)])
        else:
            edges = lo + (hi - lo) * torch.linspace(0.0, 1.0, _PIECES_SMOOTH + 1, dtype=torch.float64)
        left, right = edges[:-1, None], edges[1:, None]
        points = (0.5 * (right - left) * nodes_gl + 0.5 * (right + left)).reshape(-1)
        weights = (0.5 * (right - left) * weights_gl).reshape(-1)
        v = coordinate(points)
        nodes = list(coords[k - q : k + 1].flip(0))
        # ∫_{σ_k}^{σ_{k+1}} = −∫_{lo}^{hi}
        out.append([-scales[k + 1] * (weights * _lagrange_basis(v, nodes, j)).sum() for j in range(q + 1)])
    return out


def deis_stages(
    x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, coefficients: Sequence[Sequence[Tensor]]
) -> StageGenerator:
    """DEIS multistep with precomputed κ (see `deis_coefficients`); one stage per step (method.md §3.3).

    x̃_k = s_{k+1}·x_k/s_k + Σ_j κ_{kj}ε_{k−j} = DDIM(x_k, ε_k) + Σ_{j≥1} κ_{kj}(ε_{k−j} − ε_k) (Σ_j κ_{kj} = b_k),
    with DDIM in its α-form α_{k+1}·x̂₀ + β_{k+1}·ε_k (finite from σ_0 = ∞, where q_0 = 0).
    D-DEIS: Δ_k = b_k(ε̃_k − ε̃_{k−1}) = Σ_j κ_{kj}ε_{k−j} − b_k ε̃_{k−1} with ε̃_k = Σ_j κ_{kj}ε_{k−j}/b_k,
    ε̃_{−1} := x_T (λ_0 fitted) [official].
    """
    depth = max(len(c) for c in coefficients)
    history: list[Tensor] = []
    eps_tilde_prev = None if bool(torch.isinf(sigmas[0])) else x  # from σ = ∞: no Δ_0 (λ_0 ≡ 0)
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        eps, denoised = yield Evaluate(x, sigma, scales[k], eps=True)
        history = [eps, *history][:depth]
        kappa = coefficients[k]
        ddim = scales[k + 1] * denoised + noise_scales[k + 1] * eps
        base = sum((c * (e - eps) for c, e in zip(kappa[1:], history[1:])), ddim)
        combined = sum(c * e for c, e in zip(kappa, history))
        coeff = scales[k + 1] * (sigma_next - sigma)
        x = yield Stage(base, None if eps_tilde_prev is None else combined - coeff * eps_tilde_prev, coeff, sigma, sigma_next)
        eps_tilde_prev = eps if bool(torch.isinf(coeff)) else combined / coeff  # the step from σ = ∞ is DDIM (q_0 = 0)
    return x


class DEIS(OneStagePerStep):
    """tAB-DEIS of order r / D-DEIS (noise prediction); r = degree of the ε polynomial (r + 1 nodes, the DEIS paper's
    numbering; diffusers' `solver_order` is r + 1). NFE = number of steps ≥ r; every λ is fitted.

    Options: `basis` "t" (Lagrange in the schedule's time, tAB, default) or "log_sigma" (diffusers' log-ρ DEIS);
    `lower_order_final_below` lowers the order of the last steps when N is below it (diffusers: 15; default 0, off,
    as in the official code). The time coordinate comes from `schedule` (t = σ without one). The official
    "network at t − 1" quirk is a model option: `DiscreteEpsDenoiser(time_shift=1)`.
    """

    prediction: ClassVar[str] = "noise"
    order: ClassVar[int]
    first_lambda_fitted = True

    def __init__(
        self,
        sigmas: Tensor,
        scales: Tensor | None = None,
        unit_prior: bool = False,
        schedule: Schedule | None = None,
        basis: str = "t",
        lower_order_final_below: int = 0,
        noise_scales: Tensor | None = None,
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        if basis == "t":
            coordinate = (lambda s: s.clone()) if schedule is None else schedule.sigma_inv
        elif basis == "log_sigma":
            coordinate = torch.log
        else:
            raise ValueError(f"basis must be 't' or 'log_sigma', got {basis!r}")
        knots = None
        if isinstance(schedule, VPDiscrete) and basis == "t":
            knots = schedule.sigma(torch.arange(schedule.num_timesteps, dtype=torch.float64))
        self.schedule, self.basis = schedule, basis
        self.coefficients = deis_coefficients(self.sigmas, self.scales, self.order, coordinate, knots, lower_order_final_below)

    @classmethod
    def from_grid(cls, sigmas: Tensor, schedule: Schedule) -> "DEIS":
        return cls(
            sigmas, schedule.scale(sigmas), unit_prior=schedule.variance_preserving, schedule=schedule, noise_scales=schedule.noise_scale(sigmas)
        )

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """The official int(linspace(T−1, 0, N+1)) grid on discrete VP schedules, Karras (+ 0) otherwise (§4)."""
        return ("linspace_int" if hasattr(schedule, "num_timesteps") else "karras"), {}

    def stages(self, x: Tensor) -> StageGenerator:
        return deis_stages(x, self.sigmas, self.scales, self.noise_scales, self.coefficients)


@register_solver
class DEIS1(DEIS):
    """tAB-DEIS order 1 (linear ε extrapolation)."""

    name = "deis_1"
    order = min_nfe = 1


@register_solver
class DEIS2(DEIS):
    """tAB-DEIS order 2."""

    name = "deis_2"
    order = min_nfe = 2


@register_solver
class DEIS3(DEIS):
    """tAB-DEIS order 3, the order the paper reports."""

    name = "deis_3"
    order = min_nfe = 3
