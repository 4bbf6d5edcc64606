"""What a diffusers scheduler config means to `DODEScheduler`: its kind, its fields, its grid and its conventions.

- `classify_config`: the one place that decides which kind of model a config describes (VP/DDPM-type β tables,
  σ-space EDM, flow matching, score-SDE VE) and refuses the kinds the scheduler does not run.
- `check_config_fields`: one `SchedulerConfigError` line per bad field, naming the field and its allowed values.
- `foreign_config`: what `DODEScheduler.from_config(pipe.scheduler.config)` keeps of another scheduler's config (its
  class and the grid options the scheduler's own `__init__` does not hold), so that the swap idiom runs the replaced
  scheduler's grid.
- `reference_grid`: that grid, asked from the replaced diffusers scheduler itself (its `set_timesteps`).
- `Parameterization`: how pipeline latents, model inputs, timesteps and outputs relate to the solver's VE state
  x = x₀ + σ·n (VP latents are s·x with s = 1/√(1+σ²); EDM latents are x, preconditioned as Karras et al. 2022).
- `check_*_argument`, `check_model_output`: one-line refusals of bad `set_timesteps` / `step` arguments.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .checkpoints.diffusers_folder import _read_json
from .checkpoints.errors import CheckpointError
from .denoisers import eps_from_v, eps_from_x0, x0_from_eps
from .lambda_file import LAMBDA_LIMIT
from .schedules import FlowMatching, Schedule, flow_time

__all__ = [
    "SchedulerConfigError",
    "PREDICTION_TYPES",
    "classify_config",
    "edm_sigma_range",
    "check_config_fields",
    "foreign_config",
    "reference_grid",
    "ReferenceGrid",
    "Parameterization",
    "grid_digest",
    "read_scheduler_config",
    "check_steps_argument",
    "check_timesteps_argument",
    "check_sigmas_argument",
    "check_flow_times_argument",
    "check_model_output",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' EDM schedulers precondition these two
MAX_NFE = 10_000


class SchedulerConfigError(ValueError):
    """A scheduler config or call that cannot work (tampered λ, unknown solver, another NFE, …); one line."""


# --- the kind of model a config describes ----------------------------------------------------------------------------

# Kinds DODEScheduler runs, and those it refuses, by the scheduler class that describes them.
SUPPORTED_KINDS = ("vp", "edm", "flow")
REFUSED_KINDS = {
    "ve": "score-SDE VE models (ScoreSdeVeScheduler) are not supported by DODEScheduler; use an EDM or DDPM-type config",
    "sde": "continuous score-SDE VP models (ScoreSdeVpScheduler) are not supported by DODEScheduler; use a DDPM-type config",
}


def classify_config(base_scheduler: str | None, sigma_data: float | None = None) -> str:
    """The kind of model: "vp" (DDPM-type β table), "edm" (σ-space, EDM preconditioning), "flow" (flow matching,
    FlowMatchEuler/Heun configs: velocity networks on x_t = (1 − t)·x₀ + t·ε), or a refused kind.

    `base_scheduler` is the diffusers class the config came from (None: a DODEScheduler config of its own, EDM iff
    it holds `sigma_data`). Raises SchedulerConfigError for kinds DODEScheduler does not run.
    """
    name = base_scheduler or ""
    if name.startswith("FlowMatch"):
        kind = "flow"
    elif name in ("ScoreSdeVeScheduler", "KarrasVeScheduler"):
        kind = "ve"
    elif name == "ScoreSdeVpScheduler":
        kind = "sde"
    elif name.startswith("EDM") or (not name and sigma_data is not None):
        kind = "edm"
    else:
        kind = "vp"
    if kind not in SUPPORTED_KINDS:
        raise SchedulerConfigError(f"a {base_scheduler} config: {REFUSED_KINDS[kind]}")
    if name and _diffusers_scheduler_class(name) is None:
        raise _bad("base_scheduler", name, "the class name of a diffusers scheduler (or null)")
    return kind


def edm_sigma_range(options: Mapping[str, Any]) -> tuple[float, float]:
    """(sigma_min, sigma_max) of an EDM config's options (EDM's 0.002 and 80 by default), refused in one line unless
    0 < sigma_min < sigma_max ≤ 1e6 (rho too must be a finite number > 0)."""
    sigma_min, sigma_max, rho = options.get("sigma_min", 0.002), options.get("sigma_max", 80.0), options.get("rho", 7.0)
    if not (_finite(sigma_min) and _finite(sigma_max) and 0 < sigma_min < sigma_max <= 1e6):
        raise SchedulerConfigError(f"sigma_min, sigma_max are {sigma_min!r}, {sigma_max!r}; allowed: numbers with 0 < sigma_min < sigma_max ≤ 1e6")
    if not (_finite(rho) and rho > 0):
        raise _bad("rho", rho, "a finite number > 0")
    return float(sigma_min), float(sigma_max)


# --- field validation ----------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    try:
        return _is_real(value) and math.isfinite(float(value))
    except OverflowError:  # an int beyond float range (10**400)
        return False


def _bad(field: str, value: Any, allowed: str) -> SchedulerConfigError:
    shown = json.dumps(value) if isinstance(value, (str, bool, type(None))) else str(value)
    return SchedulerConfigError(f"{field} is {shown[:60]}; allowed: {allowed}")


def check_lambda_values(lambdas: Any) -> None:
    """λ as the config holds them: nested lists of finite real numbers (not booleans) within ±LAMBDA_LIMIT."""
    stack = [lambdas]
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif not _finite(value) or abs(float(value)) > LAMBDA_LIMIT:
            raise _bad("a value in lambdas", value, f"finite numbers within ±{LAMBDA_LIMIT:g} (not true/false), in lists per stage")


def check_config_fields(config: Mapping[str, Any], solvers: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the field and the allowed values, any config field of the wrong type or range."""
    checks: list[tuple[str, Any, str]] = [
        ("solver", lambda v: isinstance(v, str) and v in solvers, "one of " + ", ".join(sorted(solvers))),
        ("prediction_type", lambda v: v in PREDICTION_TYPES, "one of " + ", ".join(PREDICTION_TYPES)),
        ("nfe", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_NFE), f"an integer from 1 to {MAX_NFE} (or null)"),
        ("history", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64, "an integer from 1 to 64"),
        ("lambda_groups", lambda v: isinstance(v, str), 'a string: "none", "channel" or "blocks:<n>"'),
        ("integer_timesteps", lambda v: isinstance(v, bool), "true or false"),
        ("state_dtype", lambda v: v in ("float32", "float64"), "float32 or float64"),
        ("guidance_scale", lambda v: v is None or (_finite(v) and v >= 0), "a finite number ≥ 0 (or null)"),
        ("grid", lambda v: v is None or isinstance(v, str), "a grid name (or null)"),
        ("grid_kwargs", lambda v: v is None or isinstance(v, dict), "an object of grid options (or null)"),
        ("schedule_id", lambda v: v is None or isinstance(v, str), "the λ file's schedule string (or null)"),
        ("calibration", lambda v: v is None or isinstance(v, dict), "the λ file's metadata object (or null)"),
        ("grid_digest", lambda v: v is None or isinstance(v, str), "the digest export_scheduler wrote (or null)"),
        ("base_scheduler", lambda v: v is None or isinstance(v, str), "a diffusers scheduler class name (or null)"),
        ("base_config", lambda v: v is None or isinstance(v, dict), "an object of that scheduler's options (or null)"),
        ("sigma_data", lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0 (or null)"),
        ("lambdas", lambda v: v is None or isinstance(v, list), "a list of λ per stage (or null)"),
    ]
    for field, ok, allowed in checks:
        if field in config and not ok(config[field]):
            raise _bad(field, config[field], allowed)
    if config.get("lambdas") is not None:
        check_lambda_values(config["lambdas"])


def grid_digest(sigmas: Tensor, lambdas: Tensor) -> str:
    """What ties stored λ to the σ grid they were fitted on: a hash of both (float64 bytes)."""
    data = sigmas.to(torch.float64).contiguous().numpy().tobytes() + lambdas.to(torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """A scheduler_config.json as an object, read as the pipeline loader reads configs (bounded size, depth, ints)."""
    try:
        return _read_json(Path(path))
    except CheckpointError as err:
        raise SchedulerConfigError(str(err)) from None


# --- another scheduler's config (the swap idiom) ---------------------------------------------------------------------

# Options of the replaced scheduler that its grid cannot honour here: ᾱ_T = 0 puts σ_0 at infinity.
UNSUPPORTED_OPTIONS = {
    "rescale_betas_zero_snr": "zero terminal SNR (ᾱ_T = 0, σ_max = ∞) is not supported by DODEScheduler; use the config without rescale_betas_zero_snr",
    "stochastic_sampling": "stochastic flow sampling is not an ODE solver; DODEScheduler needs stochastic_sampling false",
    "invert_sigmas": "inverted flow sigmas (t from 0 to 1) are not supported by DODEScheduler; use the config without invert_sigmas",
}
# Flow-matching options the pipelines read from `scheduler.config` (SD3/FLUX compute μ from them): kept at the top
# level of a DODEScheduler's config as well as in `base_config`.
FLOW_PIPELINE_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")


def _diffusers_scheduler_class(name: str) -> type | None:
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
        return cls if isinstance(cls, type) and hasattr(cls, "set_timesteps") else None
    except ImportError:  # a dummy class whose backend (torchsde, flax, …) is not installed
        return None


def _init_keys(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")}


@functools.lru_cache(maxsize=1)
def _scheduler_classes_by_keys() -> dict[frozenset[str], str]:
    """diffusers' scheduler classes by the set of their config keys (the first name where classes share a set:
    DDIM/DDIMParallel, DDPM/DDPMParallel and the like run the same grid)."""
    import diffusers

    found: dict[frozenset[str], str] = {}
    for name in sorted(dir(diffusers), key=lambda n: (len(n), n)):
        cls = _diffusers_scheduler_class(name) if name.endswith("Scheduler") and not name.startswith("Flax") else None
        if cls is not None:
            found.setdefault(frozenset(_init_keys(cls)), name)
    return found


def identify_scheduler(config: Mapping[str, Any]) -> str | None:
    """The diffusers scheduler class whose config this is, from its keys (an in-memory config has no _class_name)."""
    keys = frozenset(key for key in config if not key.startswith("_"))
    return _scheduler_classes_by_keys().get(keys) if keys else None


def foreign_config(config: Mapping[str, Any], overrides: Mapping[str, Any], own_keys: set[str]) -> dict[str, Any]:
    """Keyword arguments that carry another scheduler's config into `DODEScheduler.from_config`.

    `base_scheduler` is the class the config came from and `base_config` its options that DODEScheduler does not
    hold itself (timestep_spacing, steps_offset, use_karras_sigmas, …), so that the grid is that scheduler's own.
    `overrides` (from_config's keyword arguments) win over the config, as diffusers' from_config lets them.
    """
    source = {**dict(config), **dict(overrides)}
    for key, message in UNSUPPORTED_OPTIONS.items():
        if source.get(key):
            raise SchedulerConfigError(message)
    name = config.get("_class_name") or identify_scheduler(config)
    if not isinstance(name, str) or name == "DODEScheduler" or "base_scheduler" in overrides:
        return {}
    classify_config(name)
    cls = _diffusers_scheduler_class(name)
    if cls is None:
        raise SchedulerConfigError(f"_class_name is {name!r}, not a diffusers scheduler; give a diffusers scheduler's config")
    options = {key: source[key] for key in sorted(_init_keys(cls) - own_keys) if key in source}
    found = {"base_scheduler": name, "base_config": json.loads(json.dumps(options, default=str))}
    solver = equivalent_solver(name, {**cls().config, **source}) if "solver" not in source else None
    return found if solver is None else {**found, "solver": solver}


def equivalent_solver(name: str, options: Mapping[str, Any]) -> str | None:
    """The package's solver that is the replaced scheduler's method (None: keep DODEScheduler's default, DDIM, which
    is also Euler's method: the ODE step x/s ← x/s + (σ' − σ)·ε̂ of DDIM and Euler is the same)."""
    order = options.get("solver_order")
    if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        return "heun"
    if name == "FlowMatchEulerDiscreteScheduler":
        return "euler"
    if name in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler") and options.get("algorithm_type") == "dpmsolver++" and order in (2, 3):
        return f"dpm_solver_pp_{order}m"
    if name == "UniPCMultistepScheduler" and options.get("solver_type") == "bh2" and options.get("predict_x0") and order in (2, 3):
        return f"unipc_{order}"
    return None


@dataclass
class ReferenceGrid:
    """The grid the replaced scheduler runs: σ_0 … σ_N (float64, descending, the last the end), the model
    timestep of each σ_0 … σ_{N−1} as that scheduler passes it, and the VE state's scale at the start per unit noise."""

    sigmas: Tensor
    timesteps: Tensor
    start_scale: float


def reference_grid(
    base_scheduler: str, options: Mapping[str, Any], steps: int | None, schedule: Schedule, custom: Mapping[str, list[float]] | None = None
) -> ReferenceGrid | None:
    """Ask the replaced diffusers scheduler for its grid at `steps` steps (its spacing, offset and σ rules), or for
    its model timesteps on a `custom` grid (`{"sigmas": …}` or `{"timesteps": …}`; None if it takes no such grid).

    Schedulers holding `sigmas` (Euler, Heun, DPM-Solver, UniPC, EDM …) give them directly, repeated entries of
    two-evaluation steps removed; DDIM-type schedulers give timesteps whose σ is the schedule's, then the last step's
    target (ᾱ = 1 → σ = 0 with set_alpha_to_one, else ᾱ_0). `start_scale`: that scheduler's VE start per unit noise
    (init_noise_sigma for VE-latent schedulers, 1/s(σ_0) = √(1+σ_0²) for VP-latent ones).
    """
    cls = _diffusers_scheduler_class(base_scheduler)
    if cls is None:
        raise SchedulerConfigError(f"base_scheduler is {base_scheduler!r}, not a diffusers scheduler class")
    kwargs = {key: value for key, value in options.items() if key in _init_keys(cls)}
    if custom and not set(custom) <= set(inspect.signature(cls.set_timesteps).parameters):
        return None
    try:
        reference = cls(**kwargs)
        reference.set_timesteps(steps, **(custom or {}))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, OverflowError, ZeroDivisionError) as err:
        asked = f"the grid {next(iter(custom.values()))}" if custom else f"a grid of {steps} steps"
        raise SchedulerConfigError(f"{base_scheduler} cannot make {asked} from this config ({str(err).splitlines()[0][:120]})") from None
    timesteps = torch.unique_consecutive(torch.as_tensor(reference.timesteps).to(torch.float64).cpu())
    sigmas = getattr(reference, "sigmas", None)
    if isinstance(sigmas, Tensor) and isinstance(schedule, FlowMatching):  # flow times t → σ = t/(1 − t), t = 1 → ∞
        sigmas = schedule.sigma(torch.unique_consecutive(sigmas.to(torch.float64).cpu()))
        if len(timesteps) != len(sigmas) - 1:
            raise SchedulerConfigError(f"{base_scheduler} made {len(timesteps)} timesteps for {len(sigmas)} noise levels; DODEScheduler cannot follow its grid")
        return ReferenceGrid(sigmas, timesteps, 1.0)
    if isinstance(sigmas, Tensor):
        sigmas = torch.unique_consecutive(sigmas.to(torch.float64).cpu())
    else:
        final = getattr(reference, "final_alpha_cumprod", None)
        end = 0.0 if final is None else float(torch.sqrt(1.0 / torch.as_tensor(final, dtype=torch.float64) - 1.0))
        sigmas = torch.cat([schedule.sigma(timesteps), torch.tensor([end], dtype=torch.float64)])
    top = getattr(schedule, "num_timesteps", None)
    if not bool(torch.isfinite(timesteps).all()) or (top is not None and (float(timesteps.min()) < 0 or float(timesteps.max()) > top - 1)):
        raise SchedulerConfigError(f"{base_scheduler} made the timesteps {_short(timesteps)}, outside 0 … {top - 1 if top else '?'}; check its options (steps_offset, timestep_spacing)")
    if len(timesteps) != len(sigmas) - 1:
        raise SchedulerConfigError(f"{base_scheduler} made {len(timesteps)} timesteps for {len(sigmas)} noise levels; DODEScheduler cannot follow its grid")
    probe = torch.ones(1)
    ve_latents = not torch.equal(reference.scale_model_input(probe, reference.timesteps[0]), probe)
    sigma_0 = float(sigmas[0])
    start = float(reference.init_noise_sigma) if ve_latents else math.sqrt(1.0 + sigma_0 * sigma_0)
    return ReferenceGrid(sigmas, timesteps, start)


# --- conventions of the pipeline's latents and model -----------------------------------------------------------------


@dataclass(frozen=True)
class Parameterization:
    """How a pipeline's latents, model inputs, timesteps and outputs relate to the VE state x = x₀ + σ·n.

    VP (DDPM-type): latent = s(σ)·x with s = 1/√(1+σ²); the model sees the latent at its DDPM timestep and returns
    ε, v or x₀. EDM (diffusers' EDM schedulers, Karras et al. 2022 Table 1): latent = x; the model sees c_in·x at
    c_noise = ¼ log σ and returns F with D(x) = c_skip·x + c_out·F (c_out < 0 for v-prediction). Flow matching:
    latent = x_t = x/(1 + σ) (t = σ/(1 + σ); at σ = ∞ the latent is the noise itself); the model sees the latent at
    timestep t·num_train_timesteps and returns the velocity v = ε − x₀ (prediction_type is not used).
    """

    kind: str
    prediction_type: str
    sigma_data: float = 0.5

    def latent_scale(self, sigma: float) -> float:
        """Pipeline latent / VE state at noise level σ."""
        if self.kind == "flow":
            return 1.0 / (1.0 + sigma)
        return 1.0 / math.sqrt(1.0 + sigma * sigma) if self.kind == "vp" else 1.0

    def input_scale(self, sigma: float) -> float:
        """What `scale_model_input` multiplies the latent by: 1 (VP, flow), c_in = 1/√(σ² + σ_data²) (EDM)."""
        return 1.0 / math.sqrt(sigma * sigma + self.sigma_data**2) if self.kind == "edm" else 1.0

    def edm_time(self, sigmas: Tensor) -> Tensor:
        """c_noise = ¼ log σ, the timestep diffusers' EDM schedulers pass to the network."""
        return 0.25 * torch.log(sigmas)

    def eps_and_denoised(self, x: Tensor, sigma: float, output: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
        """(ε̂, x̂₀) at VE state x from the network output at `latent` (ε exact for VP ε-networks)."""
        output = output.to(x.device)
        if self.kind == "flow":  # x̂₀ = x_t − t·v, ε̂ = x_t + (1 − t)·v at the latent x_t (finite at t = 1)
            t = float(flow_time(sigma))
            v, x_t = output.to(x.dtype), latent.to(x.device, x.dtype)
            return x_t + (1 - t) * v, x_t - t * v
        if self.kind == "edm":
            sign = 1.0 if self.prediction_type == "epsilon" else -1.0
            variance = sigma * sigma + self.sigma_data**2
            c_skip, c_out = self.sigma_data**2 / variance, sign * sigma * self.sigma_data / math.sqrt(variance)
            denoised = c_skip * x + c_out * output.to(x.dtype)
            return eps_from_x0(x, sigma, denoised), denoised
        if self.prediction_type == "sample":
            denoised = output.to(x.dtype)
            return eps_from_x0(x, sigma, denoised), denoised
        if self.prediction_type == "v_prediction":  # as the pipeline source turns v into ε (at the network input)
            output = eps_from_v(latent.to(output.dtype), torch.tensor(sigma, dtype=output.dtype, device=x.device), output)
        eps = output.to(x.dtype)
        return eps, x0_from_eps(x, sigma, eps)


# --- set_timesteps and step arguments --------------------------------------------------------------------------------


def check_steps_argument(steps: Any, limit: int | None) -> int | None:
    """num_inference_steps: None or an integer from 1 to `limit` (the training timesteps, where they bound it)."""
    if steps is None:
        return None
    if isinstance(steps, Tensor) and steps.numel() == 1 and not steps.is_floating_point():
        steps = int(steps)
    top = MAX_NFE if limit is None else min(limit, MAX_NFE)
    if not isinstance(steps, Integral) or isinstance(steps, bool) or not 1 <= steps <= top:  # numpy integers too
        raise _bad("num_inference_steps", steps, f"an integer from 1 to {top}")
    return int(steps)


def _numbers(field: str, values: Any, allowed: str) -> Tensor:
    try:
        tensor = torch.as_tensor(values if isinstance(values, Tensor) else [float(v) for v in values], dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise SchedulerConfigError(f"{field} must be a list of numbers; allowed: {allowed}") from None
    if len(tensor) == 0 or not bool(torch.isfinite(tensor).all()):
        raise SchedulerConfigError(f"{field} holds {_short(tensor)}; allowed: {allowed}")
    return tensor


def check_timesteps_argument(timesteps: Any, num_train_timesteps: int) -> Tensor:
    """timesteps=: finite, strictly descending model timesteps within [0, num_train_timesteps − 1], float64."""
    allowed = f"finite, strictly descending timesteps from {num_train_timesteps - 1} down to 0"
    t = _numbers("timesteps", timesteps, allowed)
    if bool((t[:-1] <= t[1:]).any()) or float(t.max()) > num_train_timesteps - 1 or float(t.min()) < 0:
        raise SchedulerConfigError(f"timesteps holds {_short(t)}; allowed: {allowed}")
    return t


def check_sigmas_argument(sigmas: Any) -> Tensor:
    """sigmas=: finite, non-negative, strictly descending noise levels, float64 (the last may be the end, 0)."""
    allowed = "finite, non-negative, strictly descending noise levels (diffusers' form ends in 0)"
    s = _numbers("sigmas", sigmas, allowed)
    if bool((s[:-1] <= s[1:]).any()) or float(s.min()) < 0:
        raise SchedulerConfigError(f"sigmas holds {_short(s)}; allowed: {allowed}")
    return s


def check_flow_times_argument(sigmas: Any) -> Tensor:
    """sigmas= of a flow config: flow times in (0, 1], strictly descending, starting at 1 (diffusers appends t = 0)."""
    allowed = "flow times strictly descending from 1 within (0, 1] (FlowMatch form; t = 0 is appended)"
    t = _numbers("sigmas", sigmas, allowed)
    if float(t[0]) != 1.0 or bool((t[:-1] <= t[1:]).any()) or float(t.min()) <= 0:
        raise SchedulerConfigError(f"sigmas holds {_short(t)}; allowed: {allowed}")
    return t


def check_model_output(model_output: Any, sample: Tensor) -> None:
    """The network output must be a finite tensor of the latents' shape (no broadcasting of a scalar or one image)."""
    if not isinstance(model_output, Tensor) or tuple(model_output.shape) != tuple(sample.shape):
        shape = tuple(model_output.shape) if isinstance(model_output, Tensor) else type(model_output).__name__
        raise SchedulerConfigError(f"model_output has shape {shape}, the latents {tuple(sample.shape)}; pass the network output for every latent")
    # One reduction instead of an elementwise isfinite (¼ of a step's cost at SDXL size): a NaN or ±inf anywhere
    # makes the sum NaN or ±inf; float32 accumulation keeps fp16 sums from overflowing.
    total = model_output.sum(dtype=torch.float32 if model_output.dtype in (torch.float16, torch.bfloat16) else None)
    if not math.isfinite(float(total)):
        raise SchedulerConfigError("model_output contains NaN or infinite values (an fp16 overflow?); run the network in float32 or bfloat16")


def _short(values: Tensor) -> str:
    items = [f"{v:.4g}" for v in values.tolist()]
    return "[" + ", ".join(items if len(items) <= 6 else items[:3] + ["…"] + items[-2:]) + "]"
