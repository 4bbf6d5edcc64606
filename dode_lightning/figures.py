"""TensorBoard figures of a fit (matplotlib, Agg backend; no Lightning imports)."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

__all__ = ["lambda_figure", "stage_kinds"]


def stage_kinds(start_sigma: float, target_sigmas: Sequence[float]) -> list[str]:
    """Per stage `predictor` (its update moves the state to a new σ) or `corrector` (it re-updates the state at the
    σ the previous stage produced, as Heun's second evaluation does)."""
    previous = [float(start_sigma), *[float(s) for s in target_sigmas[:-1]]]
    return ["corrector" if float(s) == p else "predictor" for s, p in zip(target_sigmas, previous)]


def lambda_figure(lambdas: Tensor, start_sigma: float, target_sigmas: Tensor, fitted: Sequence[bool], title: str) -> Any:
    """λ_k against the stage number on a symmetric-log axis (linear within ±1, logarithmic beyond), so a λ of 10³
    where Δ_k ≈ 0 does not flatten the others; predictor and corrector stages are marked apart and labelled with the
    σ of the state they produce, structurally fixed stages (λ ≡ 0) drawn as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [float(s) for s in target_sigmas]
    values = [float(v) for v in lambdas]
    kinds = stage_kinds(start_sigma, sigmas)
    count = len(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * count + 2), 3.6))
    ax.axhline(0.0, color="0.75", linewidth=0.8)
    ax.plot(range(count), values, color="0.6", linewidth=0.8, zorder=1)
    styles = {"predictor": ("o", "tab:blue"), "corrector": ("s", "tab:orange")}
    for kind, (marker, color) in styles.items():
        ks = [k for k in range(count) if kinds[k] == kind and fitted[k]]
        if ks:
            ax.scatter(ks, [values[k] for k in ks], marker=marker, color=color, label=kind, zorder=2)
    fixed = [k for k in range(count) if not fitted[k]]
    if fixed:
        ax.scatter(fixed, [0.0] * len(fixed), marker="x", color="0.4", label="fixed (λ ≡ 0)", zorder=2)
    if count <= 24:
        for k in range(count):
            if fitted[k]:
                ax.annotate(f"{values[k]:+.3g}", (k, values[k]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(range(count))
    ax.set_xticklabels([f"{k}\n{s:.3g}" for k, s in enumerate(sigmas)], fontsize=7)
    ax.set_xlabel("stage k  /  σ of the state it produces")
    ax.set_ylabel("λ_k (paper units, symlog)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
