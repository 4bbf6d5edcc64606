"""The one λ mechanism shared by every solver (method.md §0.3, paper Eqs. 8–10).

A solver is a generator of `Stage`s: after each network evaluation it yields the plain-solver update x̃_k (`base`)
and the correction direction Δ_k = b_k·(d̂_k − d̂_{k−1}), then receives the state to continue from. The D-solver
sends x̃_k + λ_k·Δ_k (Eq. 10 substituted into the update), the base solver sends x̃_k, a fit chooses λ_k from a
target first. Nothing else about λ lives in the solvers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

from torch import Tensor

__all__ = ["Stage", "StageGenerator", "StageCorrector", "run_stages", "LambdaRule"]


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
    """The one place λ enters: turns stage k into the state the solver continues from, x̃_k + λ_k·Δ_k.

    Called once per stage, in order (it counts k). `run_stages` uses it for whole runs; `DODEScheduler` for one
    stage per diffusers `step()`. `lambda_for=None` is the base solver.
    """

    def __init__(self, lambda_for: LambdaRule | None = None) -> None:
        self.lambda_for = lambda_for
        self.k = 0

    def __call__(self, stage: Stage) -> Tensor:
        state = stage.base
        if stage.delta is not None and self.lambda_for is not None:
            state = stage.base + self.lambda_for(self.k, stage) * stage.delta  # Eq. 10 in the update
        self.k += 1
        return state


def run_stages(
    stages: StageGenerator,
    lambda_for: LambdaRule | None = None,
    observe: Callable[[int, Stage, Tensor], None] | None = None,
) -> Tensor:
    """Drive a solver: state_k = x̃_k + λ_k·Δ_k with λ_k = lambda_for(k, stage); return the final state.

    `lambda_for=None` runs the base solver. `observe(k, stage, state)` sees each corrected state before it is sent
    on; the state sent back into the solver is detached, so a loss on stage k reaches only λ_k.
    """
    correct = StageCorrector(lambda_for)
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
