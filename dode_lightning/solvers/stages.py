"""The one λ mechanism shared by every solver (method.md §0.3, paper Eqs. 8–10).

A solver is a generator of `Stage`s: after each network evaluation it yields the plain-solver update x̃_k (`base`)
and the correction direction Δ_k = b_k·(d̂_k − d̂_{k−1}), then receives the state to continue from. The D-solver
sends x̃_k + λ_k·Δ_k (Eq. 10 substituted into the update), the base solver sends x̃_k, a fit chooses λ_k from a
target first. Nothing else about λ lives in the solvers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

__all__ = ["Stage", "StageGenerator", "StageCorrector", "LambdaLayout", "run_stages", "LambdaRule"]


@dataclass(frozen=True)
class Stage:
    """One network evaluation and the state update that consumes its output."""

    base: Tensor
    """x̃_k: the plain solver's new state (λ_k = 0)."""
    delta: Tensor | None
    """Δ_k = b_k(d̂_k − d̂_{k−1}); None where λ_k is structurally zero (no previous output)."""
    coeff: float
    """b_k = ∂x̃_k/∂d̂_k, so the official (folded) unit is λ_off = b_k·λ_k."""
    sigma: float
    """Noise level of the evaluation."""
    sigma_next: float
    """Noise level of the state this stage produces (where its teacher target lives)."""


StageGenerator = Generator[Stage, Tensor, Tensor]
LambdaRule = Callable[[int, Stage], "Tensor | float"]


class StageCorrector:
    """The one place λ enters: turns stage k into the state the solver continues from (Eq. 10 in the update).

    One direction (the paper): x̃_k + λ_k·Δ_k, λ_k a scalar. With `history = m` the correction spans Δ_k and the
    Δ of up to m − 1 earlier stages (differences of earlier denoiser outputs, Eq. 9 with m directions):
    x̃_k + Σ_j λ_kj·Δ_{k−j}; λ_k is then a tensor (m, …) whose j-th entry broadcasts against Δ (one number, or
    one per channel / spatial block expanded to the image shape, see `LambdaLayout.expand`).
    Called once per stage, in order (it counts k). `run_stages` uses it for whole runs; `DODEScheduler` for one
    stage per diffusers `step()`. `lambda_for=None` is the base solver.
    """

    def __init__(self, lambda_for: LambdaRule | None = None, history: int = 1) -> None:
        if history < 1:
            raise ValueError(f"history must be ≥ 1, got {history}")
        self.lambda_for = lambda_for
        self.history = history
        self.k = 0
        self.past: deque[Tensor] = deque(maxlen=history - 1)  # earlier Δ, most recent last

    def directions(self, stage: Stage) -> list[Tensor]:
        """Δ_k, then earlier Δ, most recent first (empty where λ_k is structurally zero)."""
        if stage.delta is None:
            return []
        return [stage.delta, *reversed(self.past)]

    def __call__(self, stage: Stage) -> Tensor:
        state = stage.base
        if stage.delta is not None and self.lambda_for is not None:
            lam = self.lambda_for(self.k, stage)
            if isinstance(lam, Tensor) and lam.dim() > 0:
                directions = self.directions(stage)
                state = stage.base + sum(lam[j] * direction for j, direction in enumerate(directions))
            else:
                state = stage.base + lam * stage.delta  # Eq. 10 in the update
        if stage.delta is not None:
            self.past.append(stage.delta)
        self.k += 1
        return state


@dataclass(frozen=True)
class LambdaLayout:
    """How many numbers λ_k holds: `history` directions × one λ per group of image elements.

    `groups`: "none" (one λ for the whole image), "channel" (one per image channel), or "blocks:N" (N × N spatial
    blocks in every channel). The compact λ of a fit is (K,) for the paper's layout, else (K, m, G).
    """

    history: int = 1
    groups: str = "none"

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be ≥ 1, got {self.history}")
        if self.groups not in ("none", "channel") and not (
            self.groups.startswith("blocks:") and self.groups[7:].isdigit() and int(self.groups[7:]) >= 1
        ):
            raise ValueError(f"lambda groups must be 'none', 'channel' or 'blocks:N' (N ≥ 1), got {self.groups!r}")

    @property
    def scalar(self) -> bool:
        """The paper's layout: one number per stage."""
        return self.history == 1 and self.groups == "none"

    def group_index(self, image_shape: Sequence[int]) -> Tensor:
        """Group of every image element, shape `image_shape` (channels first), values 0 … G − 1."""
        channels, *spatial = image_shape
        if self.groups == "none":
            return torch.zeros(image_shape, dtype=torch.long)
        channel = torch.arange(channels).reshape(-1, *[1] * len(spatial)).expand(*image_shape)
        if self.groups == "channel":
            return channel.clone()
        blocks = int(self.groups[7:])
        height, width = spatial[-2], spatial[-1]
        row = (torch.arange(height) * blocks // height).reshape(-1, 1)
        col = (torch.arange(width) * blocks // width).reshape(1, -1)
        return channel * blocks * blocks + (row * blocks + col).expand(height, width)

    def num_groups(self, image_shape: Sequence[int]) -> int:
        return int(self.group_index(image_shape).max()) + 1

    def shape(self, num_stages: int, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the compact λ of a solver with `num_stages` stages."""
        return (num_stages,) if self.scalar else (num_stages, self.history, self.num_groups(image_shape))

    def expand(self, lambdas: Tensor, image_shape: Sequence[int]) -> Tensor:
        """Compact λ → what `StageCorrector` applies: (K,) unchanged, (K, m, G) → (K, m, *image_shape)."""
        if tuple(lambdas.shape) != self.shape(len(lambdas), image_shape):
            raise ValueError(f"λ of shape {tuple(lambdas.shape)} do not fit history {self.history}, groups {self.groups!r} on images {tuple(image_shape)}")
        return lambdas if self.scalar else lambdas[:, :, self.group_index(image_shape)]


def run_stages(
    stages: StageGenerator,
    lambda_for: LambdaRule | None = None,
    observe: Callable[[int, Stage, Tensor], None] | None = None,
    history: int = 1,
    corrector: StageCorrector | None = None,
) -> Tensor:
    """Drive a solver: state_k = x̃_k + λ_k·Δ_k with λ_k = lambda_for(k, stage); return the final state.

    `lambda_for=None` runs the base solver; `history` as in `StageCorrector` (or pass a `corrector` directly).
    `observe(k, stage, state)` sees each corrected state before it is sent on; the state sent back into the solver
    is detached, so a loss on stage k reaches only λ_k.
    """
    correct = corrector if corrector is not None else StageCorrector(lambda_for, history)
    try:
        stage = next(stages)
        while True:
            k = correct.k
            state = correct(stage)
            if observe is not None:
                observe(k, stage, state)
            stage = stages.send(state.detach())
    except StopIteration as stop:
        return stop.value
