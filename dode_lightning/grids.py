"""Time grids: descending noise levels σ_0 > σ_1 > … at which solvers evaluate the denoiser.

Continuous grids return σ values (float64); the integer grids of the official code return DDPM timesteps, which
`VPDiscrete.sigma` turns into σ (timestep −1 is the clean end, σ = 0). `append_zero` adds the terminal σ = 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .schedules import FlowMatching, Schedule

__all__ = [
    "karras_sigmas",
    "time_uniform_sigmas",
    "time_quadratic_sigmas",
    "logsnr_uniform_sigmas",
    "uniform_torch_timesteps",
    "uniform_timesteps",
    "linspace_int_timesteps",
    "quad_timesteps",
    "append_zero",
    "flow_times",
    "check_flow_times",
    "make_sigmas",
    "check_sigmas",
    "GRIDS",
    "LEARNED_GRIDS",
    "TEACHER_DP",
]


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM Eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0…n−1 (n = 1 gives σ_max)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def time_uniform_sigmas(schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """n points uniform in the schedule's own time t, from t_max down to t_min."""
    t_max = schedule.t_max if t_max is None else t_max
    t_min = schedule.t_min if t_min is None else t_min
    return schedule.sigma(torch.linspace(t_max, t_min, n, dtype=torch.float64))


def time_quadratic_sigmas(schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """n points uniform in √(t − t_min): denser near the data end (DDIM's `quad`, continuous)."""
    t_max = schedule.t_max if t_max is None else t_max
    t_min = schedule.t_min if t_min is None else t_min
    ramp = torch.linspace(1, 0, n, dtype=torch.float64)
    return schedule.sigma(t_min + (t_max - t_min) * ramp**2)


def logsnr_uniform_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n points uniform in half log-SNR ℓ = −log σ (DPM-Solver++'s `logSNR` grid; σ is the VE noise level)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def uniform_torch_timesteps(n: int, num_timesteps: int = 1000) -> Tensor:
    """Official DDIM `uniform_torch` grid: ⌊linspace(0, T, n+1)[:n]⌋, descending, then −1 (ᾱ = 1)."""
    seq = torch.linspace(0, num_timesteps, n + 1, dtype=torch.float64)[:n].floor()
    return torch.cat([seq.flip(0), torch.tensor([-1.0], dtype=torch.float64)])


def uniform_timesteps(n: int, num_timesteps: int = 1000) -> Tensor:
    """Official DDIM `uniform` grid: range(0, T, T//n), descending, then −1."""
    seq = torch.arange(0, num_timesteps, num_timesteps // n, dtype=torch.float64)
    return torch.cat([seq.flip(0), torch.tensor([-1.0], dtype=torch.float64)])


def quad_timesteps(n: int, num_timesteps: int = 1000) -> Tensor:
    """Official DDIM `quad` grid: int(linspace(0, √(0.8T), n)²), descending, then −1."""
    seq = (torch.linspace(0, math.sqrt(num_timesteps * 0.8), n, dtype=torch.float64) ** 2).floor()
    return torch.cat([seq.flip(0), torch.tensor([-1.0], dtype=torch.float64)])


def linspace_int_timesteps(n: int, num_timesteps: int = 1000) -> Tensor:
    """iPNDM/DEIS grid: int(linspace(T−1, 0, n+1)); duplicates (n+1 > T) are dropped. Ends at timestep 0."""
    seq = torch.linspace(num_timesteps - 1, 0, n + 1, dtype=torch.float64).floor()
    return torch.unique_consecutive(seq)


FLOW_GRIDS = ("flow", "flux")


def flow_times(schedule: FlowMatching, n: int, grid: str = "flow") -> Tensor:
    """n descending flow times from t = 1, as diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` makes them.

    `flow`: the scheduler's own spacing (SD3), linspace(1, t_lo, n) then shifted, where t_lo is the smallest training
    time 1/T, itself shifted once already under a static shift (diffusers' double shift of the low end); `flux`:
    FluxPipeline's linspace(1, 1/n, n), then shifted. Rounded through float32 where diffusers computes in float32,
    so the grid is diffusers' to the bit (float64 tensor).
    """
    if grid == "flow":
        t_train = torch.tensor(1.0, dtype=torch.float32) / schedule.num_train_timesteps
        if schedule.mu is None:
            t_train = schedule.shift * t_train / (1 + (schedule.shift - 1) * t_train)
        raw = np.linspace(1.0 * schedule.num_train_timesteps, t_train.item() * schedule.num_train_timesteps, n) / schedule.num_train_timesteps
    elif grid == "flux":
        raw = np.linspace(1.0, 1 / n, n).astype(np.float32)  # diffusers casts given sigmas to float32 first
    else:
        raise ValueError(f"unknown flow grid {grid!r}; choose one of {', '.join(FLOW_GRIDS)}")
    return torch.from_numpy(np.asarray(schedule.shifted(raw))).to(torch.float32).to(torch.float64)


def check_flow_times(times: Tensor) -> Tensor:
    """Refuse a flow time grid that does not start at t = 1 or is not strictly descending within [0, 1]; float64."""
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if len(times) < 2 or not bool(torch.isfinite(times).all()) or float(times[0]) != 1.0:
        raise ValueError(f"a flow time grid must start at t = 1 (pure noise) and have ≥ 2 finite times, got {[round(float(t), 6) for t in times[:4]]}…")
    if bool((times[:-1] <= times[1:]).any()) or float(times[-1]) < 0:
        raise ValueError("a flow time grid must be strictly descending from 1 and end at t ≥ 0 (0 = the sample)")
    return times


_INTEGER_GRIDS = {
    "uniform_torch": uniform_torch_timesteps,
    "uniform": uniform_timesteps,
    "quad": quad_timesteps,
    "linspace_int": linspace_int_timesteps,
}
GRIDS = ("karras", "time_uniform", "time_quadratic", "logsnr_uniform", *_INTEGER_GRIDS, *FLOW_GRIDS)
# Grids whose σ calibration places (train.py); they exist only as the σ list of a λ file.
TEACHER_DP = "teacher_dp"  # GITS-like placement on the teacher's trajectory (dode_lightning.placement)
LEARNED_GRIDS = (TEACHER_DP, "joint")


def make_sigmas(
    grid: str,
    steps: int,
    schedule: Schedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    terminal_zero: bool = True,
) -> Tensor:
    """steps + 1 descending σ values: the boundaries of `steps` solver steps on a grid of the given kind.

    Continuous grids span [sigma_min, sigma_max] (default: the schedule's range); with `terminal_zero` they have
    `steps` points followed by σ = 0 (the last step denoises), otherwise `steps + 1` points ending at sigma_min.
    Integer grids carry their own end (`uniform_torch`, `uniform`, `quad`: timestep −1, σ = 0; `linspace_int`:
    timestep 0) and ignore `terminal_zero`. Flow grids (`flow`, `flux`, see `flow_times`) start at t = 1, σ = ∞.
    """
    if steps < 1:
        raise ValueError(f"a grid needs at least 1 step, got {steps}")
    if grid in FLOW_GRIDS:
        if not isinstance(schedule, FlowMatching):
            raise ValueError(f"grid {grid!r} is a flow-matching time grid and needs a flow schedule (source gmm_digits_flow or an SD3/FLUX pipeline)")
        times = flow_times(schedule, steps if terminal_zero else steps + 1, grid)
        return schedule.sigma(append_zero(times) if terminal_zero else times)
    if grid in _INTEGER_GRIDS:
        num_timesteps = getattr(schedule, "num_timesteps", None)
        if num_timesteps is None:
            raise ValueError(f"grid {grid!r} is an integer-timestep grid and needs a discrete VP schedule")
        timesteps = _INTEGER_GRIDS[grid](steps, num_timesteps)
        if len(timesteps) != steps + 1:
            raise ValueError(f"grid {grid!r} cannot place {steps} distinct steps on {num_timesteps} timesteps")
        return schedule.sigma(timesteps)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    if not 0 < lo < hi < math.inf:  # also refuses NaN
        raise ValueError(f"the grid needs 0 < sigma_min < sigma_max (finite), got sigma_min={lo}, sigma_max={hi}")
    if grid == "karras" and not 0 < rho < math.inf:
        raise ValueError(f"the Karras grid needs a finite rho > 0 (EDM uses 7), got rho={rho}")
    points = steps if terminal_zero else steps + 1
    if grid == "karras":
        sigmas = karras_sigmas(points, lo, hi, rho)
    elif grid == "logsnr_uniform":
        sigmas = logsnr_uniform_sigmas(points, lo, hi)
    elif grid in ("time_uniform", "time_quadratic"):
        build = time_uniform_sigmas if grid == "time_uniform" else time_quadratic_sigmas
        sigmas = build(schedule, points, float(schedule.sigma_inv(hi)), float(schedule.sigma_inv(lo)))
    else:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return append_zero(sigmas) if terminal_zero else sigmas


def check_sigmas(sigmas: Tensor) -> Tensor:
    """A given σ list as float64 (keeps autograd): 1-D, at least two values ≥ 0, strictly decreasing, finite except
    σ_0 = ∞ (flow matching's t = 1).

    Raises ValueError naming the first offending entry (the callers add what to do).
    """
    sigmas = torch.as_tensor(sigmas)
    if not sigmas.is_floating_point() or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"a σ list must be a 1-D float tensor of at least 2 values, got dtype {str(sigmas.dtype).replace('torch.', '')} and shape {tuple(sigmas.shape)}")
    sigmas = sigmas.to(torch.float64)
    values = sigmas.detach()
    start_at_infinity = (torch.arange(len(values)) == 0) & (values == math.inf)
    bad = ((~values.isfinite() & ~start_at_infinity) | (values < 0)).nonzero()
    if len(bad):
        k = int(bad[0])
        raise ValueError(f"σ_{k} = {float(values[k]):.6g} is not a finite value ≥ 0")
    rising = (values[1:] >= values[:-1]).nonzero()
    if len(rising):
        k = int(rising[0])
        raise ValueError(f"the σ list is not strictly decreasing: σ_{k} = {float(values[k]):.6g}, σ_{k + 1} = {float(values[k + 1]):.6g}")
    return sigmas
