"""This package's (D-)solvers as k-diffusion samplers: `sample_dode` and `sampler_from_lambda_file`.

k-diffusion's contract, which ComfyUI, A1111/Forge and many research scripts share: `model(x, sigma * s_in,
**extra_args)` returns the denoised image x̂₀ of the VE-form state x = x₀ + σ·n (the package's denoiser contract);
`x` starts as noise·σ_0; `sigmas` descend and end in 0; `callback` receives {"x", "i", "sigma", "sigma_hat",
"denoised"} once per step, after the step's first evaluation; `disable` turns the progress bar off.

The solver's own generator is driven by `run_stages` as everywhere else; the model answers its evaluations. States
are the solver's: x itself for VE-form solvers, s(σ)·x for a λ file calibrated on a VP schedule's scaled states.
Flow-matching calibrations follow ComfyUI's flow convention (`model_sampling` CONST): the k-diffusion σ is the flow
time t (from 1 to 0), x is x_t itself (starting as the noise) and the model returns x̂₀ = x_t − t·v; the solver
runs on σ_VE = t/(1 − t) from t = 1 as in `sample.py`, so k-diffusion's Euler there is exact flow Euler.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

from .api import student_of
from .denoisers import FirstStepMean
from .lambda_file import LambdaFileError, load_lambdas, schedule_from_id
from .flow import flow_state
from .schedules import FlowMatching, Schedule, VPDiscrete, flow_time, linear_betas
from .solvers import DEIS, SOLVERS, DPMSolverPP, LambdaLayout, Solver, run_stages

__all__ = ["sample_dode", "sampler_from_lambda_file", "solver_sampler", "KSampler"]


KSampler = Callable[..., Tensor]
"""A k-diffusion sampler: `(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x at sigmas[-1]`."""


def sample_dode(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    solver: str = "euler",
    lambdas: Tensor | None = None,
    history: int = 1,
    lambda_groups: str = "none",
    solver_options: dict[str, Any] | None = None,
) -> Tensor:
    """Sample with the (D-)`solver` of this package on k-diffusion's `sigmas` (VE form, as k-diffusion integrates).

    `lambdas`: one λ per stage (or the compact (stages, history, groups) layout with `history`/`lambda_groups`);
    None is the base solver. `solver_options` go to the solver's constructor; DPM-Solver++ keeps its order to the
    end by default (`lower_order_final_below=0`), as k-diffusion's `sample_dpmpp_2m` does. At λ ≡ 0 `euler`,
    `heun` and `dpm_solver_pp_2m` are k-diffusion's `sample_euler`, `sample_heun` and `sample_dpmpp_2m`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
    cls = SOLVERS[solver]
    options = dict(solver_options or {})
    if issubclass(cls, DPMSolverPP):
        options.setdefault("lower_order_final_below", 0)
    built = cls(torch.as_tensor(sigmas, dtype=torch.float64).cpu(), **options)
    return solver_sampler(built, lambdas, LambdaLayout(history, lambda_groups))(model, x, sigmas, extra_args, callback, disable)


def solver_sampler(
    solver: Solver, lambdas: Tensor | None = None, layout: LambdaLayout | None = None, flow: bool = False, first_denoised: Tensor | None = None
) -> KSampler:
    """`solver` (built on `sigmas` up to a final 0 it may stop before) with these λ as a k-diffusion sampler: from
    the VE-form state x at sigmas[0] to the VE-form state at the solver's last σ. `flow`: ComfyUI's flow convention
    (module doc) for a solver on a flow schedule's σ from ∞: x and the model's σ are x_t and t. `first_denoised`: the
    stored x̂₀ of a `first_step: mean` calibration, which answers the evaluation at sigmas[0] without calling the
    model (so the model runs one time less than the solver evaluates)."""
    layout = layout or LambdaLayout()
    if lambdas is not None and len(lambdas) != solver.num_stages:
        raise ValueError(f"{solver.name} on these {len(solver.sigmas)} sigmas has {solver.num_stages} stages, got {len(lambdas)} λ")
    index = {float(s): i for i, s in enumerate(solver.sigmas)}
    first_sigma = float(solver.sigmas[0])
    ends = solver.step_ends

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):  # noqa: ANN001, ANN202 (KSampler)
        extra_args = extra_args or {}
        rule = None
        if lambdas is not None:
            applied = layout.expand(torch.as_tensor(lambdas, dtype=torch.float64), x.shape[1:]).to(x.device)
            rule = lambda k, _stage: applied[k]  # noqa: E731
        s_in = x.new_ones([x.shape[0]])
        if first_denoised is not None and tuple(x.shape[1:]) != tuple(first_denoised.shape):
            raise ValueError(f"latents of shape {tuple(x.shape)}: the λ file was calibrated on images of shape {tuple(first_denoised.shape)}")
        starts_step = [True]
        progress = _progress(len(sigmas) - 1, disable)

        def network(x_ve: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
            x_model, sigma_model = (flow_state(x_ve, sigma), flow_time(sigma)) if flow else (x_ve, sigma)
            return model(x_model, sigma_model * s_in, **extra_args)

        evaluate = network if first_denoised is None else FirstStepMean(network, first_sigma, first_denoised)

        def denoiser(x_ve: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
            denoised = evaluate(x_ve, sigma)
            if starts_step[0]:  # the first evaluation of a step, where k-diffusion calls back
                i = index[float(sigma)]
                if callback is not None:
                    x_model = flow_state(x_ve, sigma) if flow else x_ve
                    callback({"x": x_model, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
                progress.update(i + 1 - progress.n)
            return denoised

        def observe(k: int, _stage: Any, _state: Tensor) -> None:
            starts_step[0] = ends[k]

        with torch.no_grad():
            final = run_stages(solver.stages(x if flow else x * solver.scales[0]), denoiser, rule, observe, layout.history)
        progress.update(progress.total - progress.n)
        progress.close()
        return final if flow else final / solver.scales[-1]

    return sample


def _progress(total: int, disable: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable)


def sampler_from_lambda_file(path: str | os.PathLike, require_integer_timesteps: bool = False) -> tuple[KSampler, Tensor]:
    """A k-diffusion sampler running the calibrated D-solver of a λ file, and its σ list (float64, descending, a 0
    appended where the grid ends above it).

    The sampler refuses other sigmas (the λ are fitted to this grid). On a grid ending at σ_min > 0 (DPM-Solver's
    default) it returns the solver's state at σ_min, as `sample.py` does; the appended 0 only follows k-diffusion's
    convention. A flow-matching calibration gives its flow times t (1 … 0), ComfyUI's σ for flow models. A
    `first_step: mean` calibration's stored x̂₀ answers the evaluation at σ_0, so the model runs the NFE train.py was
    given. `require_integer_timesteps`: refuse discrete-time calibrations made without `integer_timesteps` (ComfyUI
    calls discrete models at integer timesteps).
    """
    tensors, meta = load_lambdas(path)
    schedule, exact = _schedule_of(path, meta)
    if require_integer_timesteps and isinstance(schedule, VPDiscrete) and meta.get("integer_timesteps") is not True:
        raise LambdaFileError(f"{path} was not calibrated with integer_timesteps, but discrete models are called at integer timesteps here; recalibrate with the denoiser option integer_timesteps: true")
    if issubclass(SOLVERS[str(meta["solver"])], DEIS) and not exact:  # known: load_lambdas checked the grid against it
        raise LambdaFileError(f"{path}: DEIS depends on the schedule's β table, which this file names only by a hash that matches no known table; sample it with sample.py")
    student = student_of(tensors, meta, schedule, path)
    flow = isinstance(schedule, FlowMatching)
    run = solver_sampler(student.solver, student.lambdas, student.layout, flow, student.first_denoised)
    grid = schedule.sigma_inv(student.sigmas) if flow else student.sigmas
    listed = grid if float(grid[-1]) == 0 else torch.cat([grid, grid.new_zeros(1)])

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):  # noqa: ANN001, ANN202 (KSampler)
        given = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if given.shape != listed.shape or not bool(torch.allclose(given, listed, rtol=1e-6, atol=0)):
            raise ValueError(f"{path}: the λ were fitted on the sigmas {_short(listed)}, got {_short(given)}; use the σ list that comes with the λ file")
        return run(model, x, sigmas, extra_args, callback, disable)

    return sample, listed


def _short(sigmas: Tensor) -> str:
    values = [f"{v:.4g}" for v in sigmas.tolist()]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["…"] + values[-2:]) + "]"


def _schedule_of(path: str | os.PathLike, meta: dict[str, Any]) -> tuple[Schedule, bool]:
    """The schedule a λ file names, and whether it is exactly that one: a discrete β table the file names only by a
    hash nobody can rebuild gets a stand-in with the same s(σ), enough for every solver but DEIS."""
    described = str(meta.get("schedule", ""))
    schedule = schedule_from_id(described)
    if schedule is not None:
        return schedule, True
    if described.startswith("VPDiscrete"):
        return VPDiscrete(linear_betas()), False  # s(σ) = 1/√(1+σ²) whatever the table
    raise LambdaFileError(f"{path}: unknown schedule {described[:80]!r}; refit with train.py")


