"""iPNDM (improved pseudo-numerical method, Zhang & Chen 2023) and D-iPNDM as a stage generator (method.md §3.2)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import OneStagePerStep, register_solver
from .stages import Evaluate, Stage, StageGenerator

__all__ = ["IPNDM_WEIGHTS", "ipndm_stages", "IPNDM"]

IPNDM_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
"""Adams–Bashforth weights on ε_k, ε_{k−1}, … with the lower-order warm-up (method.md §3.2 table)."""


def ipndm_stages(x: Tensor, sigmas: Tensor, scales: Tensor, noise_scales: Tensor, order: int = 4) -> StageGenerator:
    """iPNDM on states x = α·x₀ + β·n: a DDIM step driven by the combined estimate ε̃_k = Σ_j a_j ε_{k−j}.

    Step k uses min(k + 1, order) raw ε's (warm-up). x̃ = α_{k+1}·x̂₀(ε̃) + β_{k+1}·ε̃ with x̂₀(ε̃) = x/s_k − σ_k·ε̃
    (= D at the first step, also where σ_0 = ∞). d̂ = ε̃, b = s_{k+1}(σ_{k+1} − σ_k) (the DDIM coefficient),
    Δ_k = b_k(ε̃_k − ε̃_{k−1}) with ε̃_{−1} := x_T, so λ_0 is fitted [official]. λ never touches the raw ε history.
    """
    if not 1 <= order <= len(IPNDM_WEIGHTS):
        raise ValueError(f"iPNDM order must be 1…{len(IPNDM_WEIGHTS)}, got {order}")
    history: list[Tensor] = []
    eps_tilde_prev = None if bool(torch.isinf(sigmas[0])) else x  # from σ = ∞: no Δ_0 (λ_0 ≡ 0)
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        eps, denoised = yield Evaluate(x, sigma, scales[k], eps=True)
        history = [eps, *history][:order]
        eps_tilde = sum(w * e for w, e in zip(IPNDM_WEIGHTS[len(history) - 1], history))
        denoised_tilde = denoised if len(history) == 1 else denoised - sigma * (eps_tilde - eps)
        coeff = scales[k + 1] * (sigma_next - sigma)
        base = scales[k + 1] * denoised_tilde + noise_scales[k + 1] * eps_tilde
        delta = None if eps_tilde_prev is None else coeff * (eps_tilde - eps_tilde_prev)
        x = yield Stage(base, delta, coeff, sigma, sigma_next)
        eps_tilde_prev = eps_tilde
    return x


@register_solver
class IPNDM(OneStagePerStep):
    """iPNDM / D-iPNDM (noise prediction). NFE = number of steps; every λ is fitted.

    `order` caps the Adams–Bashforth order (default 4, the official value). The official "call the network at
    t − 1" quirk belongs to the model, not the solver: use `DiscreteEpsDenoiser(time_shift=1)`.
    """

    name = "ipndm"
    first_lambda_fitted = True  # ε̃_{−1} := x_T
    prediction: ClassVar[str] = "noise"

    def __init__(
        self, sigmas: Tensor, scales: Tensor | None = None, unit_prior: bool = False, order: int = 4, noise_scales: Tensor | None = None
    ) -> None:
        super().__init__(sigmas, scales, unit_prior, noise_scales)
        if not 1 <= order <= len(IPNDM_WEIGHTS):
            raise ValueError(f"iPNDM order must be 1…{len(IPNDM_WEIGHTS)}, got {order}")
        self.order = order

    @classmethod
    def default_grid(cls, schedule: Schedule) -> tuple[str, dict[str, float | bool]]:
        """The official int(linspace(T−1, 0, N+1)) grid on discrete VP schedules, Karras (+ 0) otherwise (§4)."""
        return ("linspace_int" if hasattr(schedule, "num_timesteps") else "karras"), {}

    def stages(self, x: Tensor) -> StageGenerator:
        return ipndm_stages(x, self.sigmas, self.scales, self.noise_scales, self.order)
