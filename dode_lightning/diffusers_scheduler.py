"""`DODEScheduler`: any of this package's (D-)solvers as a diffusers scheduler, and `export_scheduler` for λ files.

A diffusers pipeline calls the network itself and hands each output to `step()`. The scheduler drives the solver's
own generator (the protocol of `solvers.stages`) by hand, one evaluation per `step()`: it answers the pending
`Evaluate` with the pipeline's output (through `answer`, as every driver does), applies the shared `StageCorrector`
to each `Stage` on the way, and stops at the next `Evaluate`, whose point it returns as the next latents. The
pipeline thus only ever sees evaluation points, so solvers that evaluate at a state they compute internally (UniPC's
predictor after its corrector) run unchanged. No solver arithmetic, and no thread, queue or lock, lives here.

A generator can be neither copied nor pickled, so it is not the run's state: the run is its first latents and the
network outputs handed in so far. `copy.deepcopy` and `pickle` leave the generator out, and the next `step()`
rebuilds it by replaying those outputs through a fresh generator (solver arithmetic only, bit for bit the same
states, no network call); so does a `step()` after one that raised.

Conventions (`scheduler_config.Parameterization`). DDPM-type (β table) configs: the pipeline's latents are diffusers'
VP latents x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, which equal this package's scaled state s·(x₀ + σn) with s = 1/√(1+σ²) = √ᾱ.
Noise-side and VP-state solvers (`ddim`, DPM-Solver, DEIS, …) integrate exactly that state; EDM-side VE-form solvers
(`heun`) integrate x/s: the scheduler converts at its boundary, the pipeline never sees VE states, and
`scale_model_input` is the identity. σ-space (EDM) configs, as diffusers' EDM schedulers use them: the latents are
the VE state, the network sees c_in·x at c_noise = ¼ log σ and its output is preconditioned (c_skip, c_out).

`from_config(pipe.scheduler.config)` keeps the replaced scheduler's class and grid options (`base_scheduler`,
`base_config`): without stored σ the grid, model timesteps and starting scale are that scheduler's own, and its
method where the package has it (Heun, DPM-Solver++ 2M/3M, UniPC; else DDIM, which is Euler's method too).
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from torch import Tensor

from .checkpoints.diffusers_folder import betas_from_scheduler_config
from .denoisers import DiscreteEpsDenoiser, broadcast_sigma, ve_form
from .distill import SolverSetup
from .lambda_file import LambdaFile, refuse_first_step
from .lambda_file import schedule_id as describe_schedule
from .scheduler_config import (
    EDM_PREDICTION_TYPES,
    FLOW_PIPELINE_KEYS,
    Parameterization,
    ReferenceGrid,
    SchedulerConfigError,
    check_config_fields,
    check_model_output,
    check_flow_times_argument,
    check_sigmas_argument,
    check_steps_argument,
    check_timesteps_argument,
    classify_config,
    edm_sigma_range,
    foreign_config,
    grid_digest,
    read_scheduler_config,
    reference_grid,
)
from .schedules import EDM, FlowMatching, Schedule, VPDiscrete, flow_time
from .solvers import SOLVERS, Evaluate, LambdaLayout, NFEError, Solver, Stage, StageCorrector, answer

__all__ = ["DODEScheduler", "SchedulerConfigError", "export_scheduler", "evaluation_sigmas"]

def evaluation_sigmas(solver: Solver) -> list[float]:
    """Noise level of each network evaluation of `solver`, in order (one per stage), from a dry run."""
    called: list[float] = []

    def record(x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        called.append(float(sigma))
        return torch.zeros_like(x)

    solver.sample(record, torch.zeros(1, dtype=torch.float64))
    return called


class _NetworkOutput:
    """The pipeline's network output at the pending evaluation, as the denoiser `answer` asks: its (ε̂, x̂₀)."""

    def __init__(self, to_pair: Any, output: Tensor, model_input: Tensor) -> None:
        self.to_pair, self.output, self.model_input = to_pair, output, model_input

    def eps_and_denoised(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.to_pair(x, float(sigma), self.output, self.model_input)

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.eps_and_denoised(x, sigma)[1]


class DODEScheduler(SchedulerMixin, ConfigMixin):
    """A D-ODE (or, without λ, the base) solver of this package as a diffusers scheduler.

    Config: the β table under diffusers' names (so `from_config(pipe.scheduler.config)` picks it up),
    `prediction_type` of the network, and the solver: `solver`, `grid`/`grid_kwargs` (used when no `sigmas` are
    stored), `sigmas` (the step boundaries, descending), `lambdas` (per stage, compact as the λ file holds them;
    needs `sigmas` and `nfe`, and fixes the number of steps), `history`/`lambda_groups` (their `LambdaLayout`),
    `integer_timesteps` (as the calibration's denoiser option), `state_dtype` (float32 by default: in latent
    pipelines a float32 state stays at the float32 floor, benchmarks/scheduler_cost.py; export keeps the λ file's),
    `guidance_scale` (what the λ were fitted at), `schedule_id` (the λ file's schedule, checked against the β
    table), `calibration` (the λ file's metadata, for the record), `grid_digest` (ties λ to the stored σ),
    `sigma_data` (an EDM config's) and `base_scheduler`/`base_config` (the replaced scheduler, see `from_config`).
    Bad values are refused by `scheduler_config.check_config_fields` in one line.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        solver: str = "ddim",
        nfe: int | None = None,
        grid: str | None = None,
        grid_kwargs: dict[str, Any] | None = None,
        sigmas: list[float] | None = None,
        lambdas: list[Any] | None = None,
        history: int = 1,
        lambda_groups: str = "none",
        integer_timesteps: bool = False,
        state_dtype: str = "float32",
        guidance_scale: float | None = None,
        schedule_id: str | None = None,
        calibration: dict[str, Any] | None = None,
        sigma_data: float | None = None,
        base_scheduler: str | None = None,
        base_config: dict[str, Any] | None = None,
        grid_digest: str | None = None,
    ) -> None:
        check_config_fields(self.config, SOLVERS)
        kind = classify_config(base_scheduler, sigma_data)
        if kind == "edm" and prediction_type not in EDM_PREDICTION_TYPES:
            raise SchedulerConfigError(f"prediction_type is {prediction_type!r}; allowed with an EDM config: {', '.join(EDM_PREDICTION_TYPES)}")
        self.parameterization = Parameterization(kind, prediction_type, 0.5 if sigma_data is None else float(sigma_data))
        if kind == "flow":  # the SD3/FLUX pipelines read these from scheduler.config to compute μ
            self.register_to_config(**{key: value for key, value in (base_config or {}).items() if key in FLOW_PIPELINE_KEYS})
        self._mu: float | None = None
        self.schedule = self._schedule(kind)
        if schedule_id is not None and schedule_id != describe_schedule(self.schedule):
            raise SchedulerConfigError(f"the β table of this config is not the one the λ were fitted on ({schedule_id}); export the scheduler again from the calibrated pipeline")
        self.solver_class = SOLVERS[solver]
        self.state_dtype = getattr(torch, state_dtype)
        self.order = 2 if solver == "heun" else 1  # as HeunDiscreteScheduler: two evaluations per step
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.num_inference_steps: int | None = None
        self.stored_solver = None if sigmas is None else self._solver_on(sigmas)
        self.lambdas = None if lambdas is None else self._check_lambdas(lambdas, nfe)
        self._reset()

    # --- set-up -------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' from_config, keeping the replaced scheduler's class and grid options (see `foreign_config`)."""
        own = set(inspect.signature(cls.__init__).parameters)
        kwargs.update(foreign_config(config or {}, kwargs, own))
        if config and (config.get("base_config") or {}) and str(config.get("base_scheduler", "")).startswith("FlowMatch"):
            # a flow DODEScheduler's own config: the pipeline-facing copies of base_config's keys are rebuilt from it
            config = {key: value for key, value in dict(config).items() if key not in FLOW_PIPELINE_KEYS}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """scheduler_config.json, refused above the pipeline loader's size cap (diffusers reads it whole)."""
        return read_scheduler_config(json_file)

    def _schedule(self, kind: str) -> Schedule:
        """The noise schedule of the config: the β table (VP) or EDM's σ range (from the EDM scheduler's options)."""
        if kind == "edm":
            return EDM(*edm_sigma_range({**(self.config.base_config or {}), **(self.config.grid_kwargs or {})}))
        if kind == "flow":
            return self._flow_schedule(self._mu)
        config = self.config
        try:
            betas = betas_from_scheduler_config(
                {"num_train_timesteps": config.num_train_timesteps, "beta_start": config.beta_start, "beta_end": config.beta_end,
                 "beta_schedule": config.beta_schedule, "trained_betas": config.trained_betas}
            )
        except (ValueError, TypeError) as err:
            raise SchedulerConfigError(f"β table: {err}") from None
        return VPDiscrete(betas)

    def _flow_schedule(self, mu: float | None) -> FlowMatching:
        """The flow schedule of a FlowMatch config: its static shift, or the dynamic shift at `mu` (from
        set_timesteps, or stored by export_scheduler)."""
        options = self.config.base_config or {}
        dynamic = bool(options.get("use_dynamic_shifting"))
        mu = options.get("mu") if mu is None else mu
        try:
            return FlowMatching(
                1.0 if dynamic else options.get("shift", 1.0), mu if dynamic else None, options.get("time_shift_type", "exponential"), int(self.config.num_train_timesteps)
            )
        except ValueError as err:
            raise SchedulerConfigError(str(err)) from None

    def _solver_on(self, sigmas: list[float] | Tensor) -> Solver:
        try:
            grid = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise SchedulerConfigError(f"sigmas must be a list of numbers, got {str(sigmas)[:80]}") from None
        flow_start = self.parameterization.kind == "flow" and len(grid) > 0 and bool(torch.isposinf(grid[0]))  # t = 1
        if len(grid) < 2 or not bool(torch.isfinite(grid[1:] if flow_start else grid).all()) or bool((grid[:-1] <= grid[1:]).any()) or float(grid[-1]) < 0:
            raise SchedulerConfigError(f"sigmas must be ≥ 2 finite, non-negative, strictly descending values, got {_short(grid)}")
        try:
            return self.solver_class.from_grid(grid, self.schedule)
        except (NFEError, ValueError) as err:
            raise SchedulerConfigError(f"{self.config.solver} on the stored sigmas: {err}") from None

    def _check_lambdas(self, lambdas: list[Any], nfe: int | None) -> Tensor:
        solver = self.stored_solver
        if solver is None or nfe is None:
            raise SchedulerConfigError("a config with lambdas must also hold sigmas and nfe (the grid the λ were fitted on); export it with export_scheduler")
        if solver.nfe != nfe:
            raise SchedulerConfigError(f"the stored sigmas give {self.config.solver} NFE {solver.nfe}, the config says nfe {nfe}")
        try:
            lam = torch.tensor(lambdas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise SchedulerConfigError(f"lambdas must be a list of numbers, got {str(lambdas)[:80]}") from None
        try:
            self.layout = LambdaLayout(int(self.config.history), str(self.config.lambda_groups))
        except ValueError as err:
            raise SchedulerConfigError(str(err)) from None
        wanted = "(stages,)" if self.layout.scalar else f"(stages, {self.layout.history}, groups)"
        if len(lam) != solver.num_stages or lam.dim() != (1 if self.layout.scalar else 3) or (lam.dim() == 3 and lam.shape[1] != self.layout.history):
            raise SchedulerConfigError(f"{self.config.solver} with NFE {nfe} has {solver.num_stages} stages, the config holds λ of shape {tuple(lam.shape)}, its layout needs {wanted}")
        if not bool(torch.isfinite(lam).all()):
            raise SchedulerConfigError("lambdas contain NaN or infinite values; export the scheduler again from the λ file")
        digest = grid_digest(solver.sigmas, lam)
        if self.config.grid_digest not in (None, digest):
            raise SchedulerConfigError("the stored sigmas and lambdas are not the pair the λ were fitted as (grid_digest differs); export the scheduler again from the λ file")
        self.register_to_config(grid_digest=digest)
        return lam

    def _reset(self) -> None:
        self.solver: Solver | None = None
        self._evaluations: list[float] = []
        self._step_index = 0
        self._vp_state = True
        self._applied: Tensor | None = None
        self._last_sample: Tensor | None = None
        self._last_version: int | None = None
        # The run as plain state: its first latents and the network outputs handed in so far.
        self._first_sample: Tensor | None = None
        self._outputs: list[Tensor] = []
        self._drop_generator()

    def _drop_generator(self) -> None:
        """Forget the live generator (transient: `_replay` rebuilds it from the plain state)."""
        self._generator: Any = None
        self._corrector: StageCorrector | None = None
        self._pending: Evaluate | Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_generator=None, _corrector=None, _pending=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._last_version is not None:
            self._last_version = self._last_sample._version  # the copy's own in-place counter

    @property
    def calibrated_steps(self) -> int | None:
        """The `num_inference_steps` the λ were fitted for (None: no λ, any number of steps)."""
        if self.lambdas is None or self.stored_solver is None:
            return None
        return self.solver_class.steps_for_nfe(self.stored_solver.nfe)

    @property
    def step_index(self) -> int | None:
        """Number of `step()` calls since `set_timesteps` (None before it)."""
        return None if self.solver is None else self._step_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | Tensor | None = None,
        sigmas: list[float] | Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the solver for this run and the timesteps the pipeline loops over (one per network evaluation).

        `num_inference_steps` counts solver steps as diffusers does (Heun NFE 2N − 1: N). Without stored σ the grid is
        the replaced scheduler's (`base_scheduler`, from `from_config`), else the package's `grid`. `timesteps=`
        (descending model timesteps; σ = 0 appended) or `sigmas=` (descending VE noise levels in diffusers' form,
        ending in 0; a list not ending in 0 gets it appended) give a custom grid instead. With λ only the calibrated
        grid is accepted. Flow-matching configs take what the SD3/FLUX pipelines pass: `sigmas=` as flow times t
        (descending from 1, unshifted, as FlowMatchEulerDiscreteScheduler takes them) and `mu=` for a dynamic shift.
        """
        kind = self.parameterization.kind
        if kind == "flow":
            self._set_mu(mu)
        elif mu is not None:
            raise SchedulerConfigError("set_timesteps got mu=, which only flow-matching (FlowMatch*) configs take")
        steps = check_steps_argument(num_inference_steps, self.config.num_train_timesteps if kind == "vp" else None)
        if timesteps is not None and sigmas is not None:
            raise SchedulerConfigError("set_timesteps got timesteps= and sigmas=; pass one of them")
        if steps is not None and (timesteps is not None or sigmas is not None):
            raise SchedulerConfigError("set_timesteps got num_inference_steps and a custom timesteps=/sigmas= grid; pass one of them")
        custom, request = None, None
        if timesteps is not None:
            if kind != "vp":
                raise SchedulerConfigError("timesteps= needs a DDPM-type (β table) config; pass sigmas= to an EDM scheduler")
            checked = check_timesteps_argument(timesteps, self.config.num_train_timesteps)
            custom, request = _append_zero(self.schedule.sigma(checked)), {"timesteps": checked.tolist()}
        elif sigmas is not None and kind == "flow":
            request = {"sigmas": check_flow_times_argument(sigmas).tolist()}
            custom = self._reference(None, request).sigmas
        elif sigmas is not None:
            custom = check_sigmas_argument(sigmas)
            custom = custom if float(custom[-1]) == 0 else _append_zero(custom)
            request = {"sigmas": custom.tolist()}
        solver, reference = self._solver_for(steps, custom, request)
        self._reset()
        self.solver = solver
        self._vp_state = bool(torch.allclose(solver.scales, self.schedule.scale(solver.sigmas), rtol=1e-12, atol=0))
        if not self._vp_state and not bool((solver.scales == 1).all()):
            raise SchedulerConfigError(f"{self.config.solver} integrates states that are neither VP-scaled nor VE-form; it cannot run in a diffusers pipeline")
        self._evaluations = evaluation_sigmas(solver)
        self.num_inference_steps = self.solver_class.steps_for_nfe(solver.nfe) if steps is None else steps
        model_time = self._model_time(torch.tensor(self._evaluations, dtype=torch.float64), reference)
        # Integer timesteps as diffusers' schedulers pass them; fractional ones in float64 as `DiscreteEpsDenoiser`
        # passes them (float32 on MPS, which has no float64; diffusers' UNets embed t in float32 anyway).
        fractional_dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        integral = bool((model_time == model_time.round()).all())
        self.timesteps = model_time.to(torch.long if integral else fractional_dtype).to(device)
        self.sigmas = torch.tensor(self._evaluations + [float(solver.sigmas[-1])], dtype=torch.float64)
        sigma_0 = float(solver.sigmas[0])
        if kind == "flow":  # x_1 = ε: the pipeline's latents start as unit noise
            self.init_noise_sigma = 1.0
        elif reference is not None:  # the replaced scheduler's starting state, in this scheduler's latents
            self.init_noise_sigma = reference.start_scale * self.parameterization.latent_scale(sigma_0)
        else:
            self.init_noise_sigma = float(solver.init_state(torch.ones(1, dtype=torch.float64))) * self._vp_ratio(sigma_0)

    def _model_time(self, sigmas: Tensor, reference: ReferenceGrid | None) -> Tensor:
        """The network's timestep at each evaluation σ: the replaced scheduler's own at its grid points, else t(σ)
        (VP, as `DiscreteEpsDenoiser` computes it) or c_noise = ¼ log σ (EDM)."""
        if self.parameterization.kind == "edm":
            time = self.parameterization.edm_time(sigmas)
        elif self.parameterization.kind == "flow":  # t·T from float32 t, as the flow pipelines and `GuidedVelocityModel`
            time = (flow_time(sigmas).to(torch.float32) * self.config.num_train_timesteps).to(torch.float64)
        else:
            time = DiscreteEpsDenoiser(None, self.schedule, integer_timesteps=self.config.integer_timesteps).timestep(sigmas)
        if reference is not None:
            grid = reference.sigmas[:-1]
            for i, sigma in enumerate(sigmas.tolist()):
                match = torch.isclose(grid, torch.tensor(sigma, dtype=torch.float64), rtol=1e-12, atol=0).nonzero()
                if len(match):
                    time[i] = reference.timesteps[int(match[0])]
        return time

    def _solver_for(
        self, num_inference_steps: int | None, custom: Tensor | None, custom_request: dict[str, list[float]] | None = None
    ) -> tuple[Solver, ReferenceGrid | None]:
        stored = self.stored_solver
        steps = self.calibrated_steps
        if steps is not None and stored is not None:
            if custom is not None and not _same_grid(custom, stored.sigmas):
                raise SchedulerConfigError(f"the λ were fitted on the grid {_short(stored.sigmas)}; a custom timesteps=/sigmas= grid cannot use them")
            if custom is None and num_inference_steps not in (None, steps):
                raise SchedulerConfigError(
                    f"this D-{self.config.solver} scheduler was calibrated for NFE {stored.nfe} ({steps} steps); "
                    f"call the pipeline with num_inference_steps={steps} or calibrate λ for {num_inference_steps} steps"
                )
            return stored, None
        if custom is not None:
            reference = self._reference(None, custom_request)
            return self._solver_on(custom if reference is None else reference.sigmas), reference
        if stored is not None and num_inference_steps in (None, self.solver_class.steps_for_nfe(stored.nfe)):
            return stored, None
        if num_inference_steps is None:
            raise SchedulerConfigError("set_timesteps needs num_inference_steps (this config stores no grid)")
        reference = self._reference(num_inference_steps, None)
        if reference is not None:
            return self._solver_on(reference.sigmas), reference
        return self._default_solver(num_inference_steps), None

    def _reference(self, steps: int | None, custom: dict[str, list[float]] | None) -> ReferenceGrid | None:
        """The replaced scheduler's grid (None without one, or with the package's `grid` named)."""
        if self.config.base_scheduler is None or self.config.grid is not None:
            return None
        shared = {key: self.config[key] for key in SHARED_WITH_BASE if self.config[key] is not None}
        if self.parameterization.kind == "flow" and self._mu is not None:
            custom = {**(custom or {}), "mu": self._mu}
        return reference_grid(self.config.base_scheduler, {**(self.config.base_config or {}), **shared}, steps, self.schedule, custom)

    def _set_mu(self, mu: float | None) -> None:
        """The dynamic shift of this run (flow configs with use_dynamic_shifting need it, as diffusers'); the schedule
        is rebuilt with it, and λ fitted at another shift are refused."""
        dynamic = bool((self.config.base_config or {}).get("use_dynamic_shifting"))
        if dynamic and mu is None and (self.config.base_config or {}).get("mu") is None:
            raise SchedulerConfigError("this flow config shifts its grid by image size (use_dynamic_shifting): pass mu= to set_timesteps, as the FLUX pipeline does")
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
            raise SchedulerConfigError(f"mu must be a finite number, got {str(mu)[:40]}")
        self._mu = float(mu) if dynamic and mu is not None else None
        self.schedule = self._flow_schedule(self._mu)
        fitted = self.config.schedule_id
        if fitted is not None and fitted != describe_schedule(self.schedule):
            raise SchedulerConfigError(f"the λ of this scheduler were fitted on {fitted}, this run's shift gives {describe_schedule(self.schedule)}; calibrate for this image size (mu)")

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Runs start at the first timestep (the flow pipelines call this with 0); img2img offsets are refused."""
        if begin_index != 0:
            raise SchedulerConfigError("DODEScheduler runs start at the first timestep (begin_index 0); img2img is not supported")

    def _default_solver(self, steps: int) -> Solver:
        nfe = 2 * steps - 1 if self.config.solver == "heun" else steps
        try:
            setup = SolverSetup.resolve(self.config.solver, nfe, self.schedule, self.config.grid, **(self.config.grid_kwargs or {}))
            return setup.build()
        except (NFEError, ValueError, TypeError) as err:
            raise SchedulerConfigError(f"{self.config.solver} with {steps} steps: {err}") from None

    # --- the pipeline's loop ------------------------------------------------------------------------------------

    def _vp_ratio(self, sigma: float) -> float:
        """Pipeline latent / solver state at noise level σ: 1 for states in the latents' form, s(σ) = 1/√(1+σ²) for
        VE-form solvers (Heun) in VP pipelines."""
        return 1.0 if self._vp_state else self.parameterization.latent_scale(sigma)

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The network input at the current evaluation: the latents themselves (VP), c_in(σ)·latents (EDM)."""
        if self.parameterization.kind in ("vp", "flow"):
            return sample
        if self.solver is None or self._step_index >= len(self._evaluations):
            raise SchedulerConfigError("scale_model_input called outside a run; call set_timesteps and loop over scheduler.timesteps")
        return sample * self.parameterization.input_scale(self._evaluations[self._step_index])

    def _eps_and_denoised(self, x: Tensor, sigma: float, output: Tensor, model_input: Tensor) -> tuple[Tensor, Tensor]:
        """(ε̂, x̂₀) at VE-form x from the network output, as `sample.py`'s denoisers form them (ε exact for ε-nets)."""
        return self.parameterization.eps_and_denoised(x, sigma, output, model_input)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Refused: img2img and inpainting start mid-trajectory, where a fitted D-solver has no calibrated state."""
        raise SchedulerConfigError("DODEScheduler does not support img2img or inpainting (add_noise); use it with text-to-image pipelines, or the pipeline's own scheduler for these")

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor | None = None) -> Tensor:
        """Refused as `add_noise` (flow pipelines' img2img and inpainting call this one)."""
        return self.add_noise(sample, noise, timestep)

    def step(
        self,
        model_output: Tensor,
        timestep: int | float | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor]:
        """Hand the network output of evaluation k to the solver run; return where it evaluates next (or its end).

        `eta`, `use_clipped_model_output` and `generator` are accepted because DDIM/DDPM pipelines pass them; the
        solvers are deterministic ODE solvers (eta must be 0) and never clip.
        """
        self._check_step(model_output, timestep, sample, eta)
        k = self._step_index
        if k == 0:
            self._start(sample)
        elif self._generator is None:
            self._replay()  # a copied or unpickled scheduler, or a step after one that raised
        self._answer(model_output, sample)
        self._outputs.append(model_output)
        self._step_index += 1
        pending = self._pending
        finished = not isinstance(pending, Evaluate)
        if finished != (self._step_index == len(self._evaluations)) or (not finished and not math.isclose(float(pending.sigma), self._evaluations[k + 1], rel_tol=1e-9)):
            raise RuntimeError(f"{self.config.solver} did not evaluate at its dry-run noise levels (step {k + 1}: σ = {'end' if finished else float(pending.sigma)})")
        prev_sample = self._latents(pending, sample.dtype)
        self._remember(prev_sample)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _check_step(self, model_output: Tensor, timestep: int | float | Tensor, sample: Tensor, eta: float) -> None:
        """Refuse, in one line, a step() call that does not continue this run: no run, eta ≠ 0, one step too many, a
        timestep out of order, a network output of another shape or not finite, latents changed since the last step."""
        if self.solver is None:
            raise SchedulerConfigError("call set_timesteps before step")
        if eta:
            raise SchedulerConfigError(f"DODEScheduler integrates the probability-flow ODE; eta must be 0, got {eta}")
        k = self._step_index
        if k >= len(self._evaluations):
            raise SchedulerConfigError(f"step called {k + 1} times, but this run has {len(self._evaluations)} evaluations; call set_timesteps again")
        expected_t = float(self.timesteps[k])
        if not abs(float(timestep) - expected_t) <= 1e-3:
            raise SchedulerConfigError(f"step {k} got timestep {float(timestep)}, expected {expected_t}: loop over scheduler.timesteps in order")
        check_model_output(model_output, sample)
        if k > 0 and not self._is_last_sample(sample):
            raise SchedulerConfigError("the latents changed between steps (edited in place or replaced; img2img/inpainting pipelines are not supported); pass back the prev_sample of the last step unchanged")

    def _remember(self, prev_sample: Tensor) -> None:
        """Keep what step() returned, to recognise it at the next step: the tensor and its in-place version counter
        (no copy), or a copy where the tensor has no counter (inference mode)."""
        try:
            self._last_sample, self._last_version = prev_sample, prev_sample._version
        except RuntimeError:
            self._last_sample, self._last_version = prev_sample.clone(), None

    def _is_last_sample(self, sample: Tensor) -> bool:
        last = self._last_sample
        if self._last_version is not None and last._version != self._last_version:
            return False  # what step() returned was edited in place
        return sample.shape == last.shape and (sample is last or torch.equal(sample, last))

    def _start(self, sample: Tensor) -> None:
        """Start the solver run from the pipeline's first latents, up to its first evaluation."""
        self._first_sample, self._outputs = sample.detach().clone(), []
        self._replay()
        if not isinstance(self._pending, Evaluate) or not math.isclose(float(self._pending.sigma), self._evaluations[0], rel_tol=1e-9):
            raise RuntimeError(f"{self.config.solver} did not start with an evaluation at σ = {self._evaluations[0]}")

    def _replay(self) -> None:
        """A fresh generator from the first latents, fed the outputs handed in so far as `step()` fed them."""
        sample = self._first_sample
        lambdas = None if self.lambdas is None else self._lambdas_for(tuple(sample.shape[1:]), sample.device)
        history = 1 if self.lambdas is None else self.layout.history
        self._corrector = StageCorrector(None if lambdas is None else (lambda i, _stage: lambdas[i]), history)
        self._generator = self.solver.stages(sample.to(self.state_dtype) / self._vp_ratio(float(self.solver.sigmas[0])))
        self._advance(None)
        for k, output in enumerate(self._outputs):
            self._answer(output, sample if k == 0 else self._latents(self._pending, sample.dtype))

    def _answer(self, model_output: Tensor, model_input: Tensor) -> None:
        """Answer the pending evaluation with this step's network output (and input), then advance the run."""
        try:
            self._advance(answer(_NetworkOutput(self._eps_and_denoised, model_output, model_input), self._pending))
        except BaseException:
            self._drop_generator()  # the run stays at the last accepted output; the next step() replays up to it
            raise

    def _advance(self, reply: Any) -> None:
        """Send `reply` into the run and drive it to its next evaluation, λ-correcting each `Stage` on the way; at the
        end of the run its final state is left pending."""
        try:
            message = self._generator.send(reply)
            while isinstance(message, Stage):
                message = self._generator.send(self._corrector(message))
        except StopIteration as stop:
            message = stop.value
        self._pending = message

    def _latents(self, pending: Evaluate | Tensor, dtype: torch.dtype) -> Tensor:
        """The pipeline's latents at the pending evaluation (its VE point times the latent scale at σ) or at the end."""
        if isinstance(pending, Evaluate):
            if self._vp_state:  # the solver's scaled state is the latent itself
                return pending.x.to(dtype)
            x_ve, sigma = ve_form(pending.x, pending.sigma, pending.scale), float(pending.sigma)
            return (x_ve * broadcast_sigma(self.parameterization.latent_scale(sigma), x_ve)).to(dtype)
        return (pending * self._vp_ratio(float(self.solver.sigmas[-1]))).to(dtype)

    def _lambdas_for(self, image_shape: tuple[int, ...], device: torch.device) -> Tensor:
        """The compact λ expanded by their layout for images of this shape (float64, as `sample.py` applies them)."""
        if self._applied is None or (not self.layout.scalar and tuple(self._applied.shape[2:]) != image_shape):
            try:
                self._applied = self.layout.expand(self.lambdas, image_shape).to(device)
            except ValueError as err:
                raise SchedulerConfigError(f"{err}; these λ were fitted for latents of another shape") from None
        return self._applied

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Warn when a pipeline runs at another classifier-free guidance scale than the λ were fitted at.

        diffusers never passes the guidance scale to the scheduler; call this (or pass `guidance_callback` as the
        pipeline's `callback_on_step_end`) to have it checked.
        """
        fitted = self.config.guidance_scale
        if fitted is not None and not math.isclose(float(guidance_scale), float(fitted), rel_tol=1e-6):
            warnings.warn(f"the λ of this scheduler were fitted at guidance_scale={fitted}; at {guidance_scale} they are not calibrated (recalibrate for it)", stacklevel=2)

    def guidance_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`callback_on_step_end` that checks the pipeline's `guidance_scale` once, at the first step."""
        if step == 0 and getattr(pipe, "guidance_scale", None) is not None:
            self.check_guidance_scale(pipe.guidance_scale)
        return callback_kwargs


# Config fields DODEScheduler holds itself that the replaced scheduler's grid also reads.
SHARED_WITH_BASE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type", "sigma_data")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.reshape(-1), sigmas.new_zeros(1)])


def _same_grid(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b.to(a.dtype), rtol=1e-9, atol=0))


def _short(sigmas: Tensor) -> str:
    values = [f"{v:.4g}" for v in sigmas.tolist()]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["…"] + values[-2:]) + "]"


def _scheduler_config(pipeline: str | os.PathLike) -> dict[str, Any]:
    """The scheduler config of a pipeline folder, its `scheduler/` folder or a scheduler_config.json."""
    path = Path(pipeline)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
        if candidate.is_file():
            return read_scheduler_config(candidate)
    raise FileNotFoundError(f"no scheduler config in {path}: give the diffusers pipeline folder the λ were fitted on (it holds scheduler/scheduler_config.json)")


def _export_flow(fitted: LambdaFile, base: dict[str, Any], pipeline: str | os.PathLike) -> DODEScheduler:
    """`export_scheduler` for a λ file fitted on a flow-matching (SD3/FLUX) pipeline: its FlowMatch config with the
    fitted shift (μ of the calibrated image size stored for dynamic shifting), the stored σ from t = 1 and the λ."""
    lambda_file, meta = fitted.path, fitted.metadata
    if not str(base.get("_class_name", "")).startswith("FlowMatch"):
        raise SchedulerConfigError(f"{lambda_file} was fitted on a flow-matching model, but {pipeline} has a {base.get('_class_name')} scheduler; give the calibrated SD3/FLUX pipeline folder")
    options = foreign_config(base, {}, set(inspect.signature(DODEScheduler.__init__).parameters))
    options.pop("solver", None)  # the λ file's solver, not the replaced scheduler's
    shift = meta.get("time_shift") or {}
    if "mu" in shift:
        options["base_config"] = {**options["base_config"], "mu": shift["mu"]}
    probe = DODEScheduler(num_train_timesteps=int(base.get("num_train_timesteps", 1000)), **options)
    if describe_schedule(probe.schedule) != meta.get("schedule"):
        raise SchedulerConfigError(f"{pipeline}: its time shift is not the one {lambda_file} was fitted at ({meta.get('time_shift')}); give the calibrated pipeline folder")
    tensors, meta = fitted.load(schedule=probe.schedule)
    refuse_first_step(tensors, lambda_file, "a diffusers pipeline (it calls the network at every timestep)")
    lambdas = tensors["lambdas"].to(torch.float64)
    try:
        setup = SolverSetup.resolve(meta["solver"], int(meta["nfe"]), probe.schedule, meta.get("grid"), tensors["sigmas"], **(meta.get("grid_kwargs") or {}))
        solver = setup.build()
    except (KeyError, NFEError, ValueError, TypeError) as err:
        raise SchedulerConfigError(f"{lambda_file}: cannot rebuild its solver ({err})") from None
    return DODEScheduler(
        num_train_timesteps=int(base.get("num_train_timesteps", 1000)),
        solver=setup.name,
        nfe=solver.nfe,
        sigmas=solver.sigmas.tolist(),
        lambdas=lambdas.tolist(),
        history=int(meta.get("history", 1)),
        lambda_groups=str(meta.get("lambda_groups", "none")),
        state_dtype=str(meta.get("state_dtype", "float64")),
        guidance_scale=meta.get("guidance_scale"),
        schedule_id=meta.get("schedule"),
        calibration=meta,
        grid_digest=grid_digest(solver.sigmas, lambdas),
        **options,
    )


def export_scheduler(lambda_file: str | os.PathLike, pipeline: str | os.PathLike, integer_timesteps: bool = False) -> DODEScheduler:
    """A `DODEScheduler` running the calibrated D-solver of `lambda_file` in the pipeline folder it was fitted on.

    The λ file stores only a hash of the β table, so the pipeline folder (or its scheduler config) supplies the
    table and the network's prediction type; a table of another hash is refused. `integer_timesteps` must be what
    the calibration's denoiser used (its `integer_timesteps` option). Save the result with `save_pretrained`.
    """
    fitted = LambdaFile.read(lambda_file)
    meta = fitted.metadata
    schedule_wanted = str(meta.get("schedule", ""))
    if schedule_wanted.startswith("FlowMatching"):
        return _export_flow(fitted, _scheduler_config(pipeline), pipeline)
    if not schedule_wanted.startswith("VPDiscrete"):
        raise SchedulerConfigError(f"{lambda_file} was fitted on the schedule {schedule_wanted or '?'}; DODEScheduler runs discrete VP (diffusers DDPM-type) models only")
    base = _scheduler_config(pipeline)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    init = {k: base[k] for k in keys if k in base}
    schedule = VPDiscrete(betas_from_scheduler_config(init))
    if describe_schedule(schedule) != schedule_wanted:
        raise SchedulerConfigError(f"{pipeline}: its β table is not the one {lambda_file} was fitted on ({schedule_wanted}); give the calibrated pipeline folder")
    fitted_prediction, folder_prediction = meta.get("prediction_type", "epsilon"), init.get("prediction_type", "epsilon")
    if fitted_prediction != folder_prediction:
        raise SchedulerConfigError(f"{pipeline} has prediction_type {folder_prediction!r}, but {lambda_file} was fitted on a {fitted_prediction!r} network; give the calibrated pipeline folder")
    tensors, meta = fitted.load(schedule=schedule)  # its σ list becomes the config's diffusers `sigmas`
    refuse_first_step(tensors, lambda_file, "a diffusers pipeline (it calls the network at every timestep)")
    lambdas = tensors["lambdas"]
    try:
        setup = SolverSetup.resolve(meta["solver"], int(meta["nfe"]), schedule, meta.get("grid"), tensors["sigmas"], **(meta.get("grid_kwargs") or {}))
        solver = setup.build()
    except (KeyError, NFEError, ValueError, TypeError) as err:
        raise SchedulerConfigError(f"{lambda_file}: cannot rebuild its solver ({err})") from None
    if "target_sigmas" in tensors and not _same_grid(solver.target_sigmas, tensors["target_sigmas"].to(torch.float64)):
        raise SchedulerConfigError(f"{lambda_file}: the rebuilt grid does not match the σ stored in the file; refit with train.py")
    return DODEScheduler(
        **init,
        solver=setup.name,
        nfe=solver.nfe,
        grid=setup.grid,
        grid_kwargs=setup.grid_kwargs,
        sigmas=solver.sigmas.tolist(),
        lambdas=lambdas.to(torch.float64).tolist(),
        history=int(meta.get("history", 1)),
        lambda_groups=str(meta.get("lambda_groups", "none")),
        integer_timesteps=integer_timesteps,
        state_dtype=str(meta.get("state_dtype", "float64")),
        guidance_scale=meta.get("guidance_scale"),
        schedule_id=schedule_wanted,
        calibration=meta,
        sigma_data=None,
        base_scheduler=None,
        base_config=None,
        grid_digest=grid_digest(solver.sigmas, lambdas.to(torch.float64)),
    )
