"""The λ file: a safetensors file (tensors + JSON metadata) that loads without executing anything.

It records what the λ were fitted for; loading it for another solver, NFE, grid, schedule, denoiser or guidance scale
is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file
from torch import Tensor

from .atomic import atomic_path
from .checkpoints.errors import one_line, quoted
from .distill import SolverSetup
from .grids import check_sigmas
from .schedules import EDM, VE, FlowMatching, Schedule, VPContinuous, VPDiscrete, cosine_betas, linear_betas
from .solvers import SOLVERS, LambdaLayout, NFEError

__all__ = [
    "save_lambdas",
    "load_lambdas",
    "LambdaFile",
    "refuse_first_step",
    "lambdas_to_apply",
    "check_lambdas",
    "check_metadata",
    "check_grid",
    "schedule_id",
    "lambda_file_in",
    "schedule_from_id",
    "LambdaFileError",
    "MATCH_KEYS",
    "LAMBDA_LIMIT",
]

# Format 2 holds the student's grid as the float64 tensor `sigmas` (σ_0 … σ_N, descending); format 1 files held
# only the evaluation σ there (now `eval_sigmas`), and their grid is rebuilt from the metadata on loading.
FORMAT = "dode-lightning/lambdas/2"
FORMAT_1 = "dode-lightning/lambdas/1"
# Fields that must agree between a λ file and the run that uses it.
# `guidance_scale` (float) is recorded for text-conditional pipelines: λ fitted for one guided denoiser;
# `time_shift` for flow-matching models: λ fitted on one shifted time grid.
MATCH_KEYS = ("solver", "nfe", "grid", "grid_kwargs", "schedule", "denoiser", "guidance_scale", "time_shift")
# A λ file holds λ, σ lists and at most one image-sized x̂₀ (kilobytes to a few MiB); the whole file is read at once.
MAX_FILE_BYTES = 256 * 2**20
# Fitted λ are O(1) (paper units); far beyond this bound λ·Δ overflows and the samples are black.
LAMBDA_LIMIT = 1e6
# JSON types of the metadata fields this package reads back (a field may be absent; extra fields are kept as they are).
_NUMBER = (int, float)
METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "solver": (str,),
    "nfe": (int,),
    "num_stages": (int,),
    "grid": (str, type(None)),
    "grid_kwargs": (dict,),
    "schedule": (str,),
    "prediction": (str,),
    "denoiser": (str,),
    "state_dtype": (str,),
    "guidance_scale": (*_NUMBER, type(None)),
    "history": (int,),
    "lambda_groups": (str,),
    "class_conditional": (bool, type(None)),
    "dropped_stages": (list,),
    "integer_timesteps": (bool,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list", bool: "true or false", type(None): "null"}


class LambdaFileError(ValueError):
    """A λ file that is unreadable or was fitted for another configuration."""


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false is no integer or number here
        return bool in types
    return isinstance(value, types)


def check_metadata(metadata: dict[str, Any], origin: str) -> None:
    """Refuse metadata whose fields (METADATA_TYPES) have the wrong JSON type, e.g. `"nfe": "10"`, in one line.

    `grid_kwargs` must map names to numbers, strings, true/false or null; `dropped_stages` must list integers.
    """
    for key, types in METADATA_TYPES.items():
        if key not in metadata:
            continue
        value = metadata[key]
        wrong = not _has_type(value, types)
        if not wrong and key == "grid_kwargs":
            wrong = not all(_has_type(v, (*_NUMBER, str, bool, type(None))) for v in value.values())
        if not wrong and key == "dropped_stages":
            wrong = not all(_has_type(v, (int,)) for v in value)
        if wrong:
            expected = " or ".join(_TYPE_NAMES[t] for t in types if not (t is int and float in types))
            detail = {"grid_kwargs": " of numbers", "dropped_stages": " of integers"}.get(key, "")
            raise LambdaFileError(f"{origin}: metadata field {key!r} is {quoted(value)}, expected {expected}{detail}; refit with train.py")


def schedule_id(schedule: Schedule) -> str:
    """A short, stable description of a schedule (class and parameters; discrete β tables by hash)."""
    # `own_grid` (a flow schedule's default grid) is not the schedule: the λ file records the grid itself.
    fields = {k: v for k, v in sorted(vars(schedule).items()) if isinstance(v, (int, float, str)) and k != "own_grid"}
    betas = getattr(schedule, "betas", None)
    if betas is not None:
        fields["betas_sha256"] = hashlib.sha256(betas.numpy().tobytes()).hexdigest()[:16]
    return f"{type(schedule).__name__}{json.dumps(fields, sort_keys=True)}"


def check_lambdas(lambdas: Tensor, origin: str, remedy: str = "refit with train.py") -> None:
    """Refuse λ that are not a float tensor (one row per stage) of finite values within ±LAMBDA_LIMIT.

    `origin` names where they come from and `remedy` what to do, for the one-line error.
    """
    if not lambdas.is_floating_point() or lambdas.ndim == 0:
        raise LambdaFileError(f"{origin} holds λ of dtype {str(lambdas.dtype).replace('torch.', '')} and shape {tuple(lambdas.shape)}, not a float tensor per stage; {remedy}")
    bad = ~(lambdas.isfinite() & (lambdas.abs() <= LAMBDA_LIMIT))
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        name = f"λ_{index[0]}" if len(index) == 1 else f"λ{list(index)}"
        raise LambdaFileError(f"{origin} holds {name} = {float(lambdas[index]):.6g}, but λ must be finite and within ±{LAMBDA_LIMIT:g}; {remedy}")


def save_lambdas(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write `tensors` (must include `lambdas` and the grid `sigmas`, checked as on loading) and metadata atomically."""
    path = Path(path)
    check_lambdas(tensors["lambdas"], "the fit")
    tensors = {**tensors, "sigmas": tensors["sigmas"].detach().to(torch.float64)}
    check_grid(tensors["sigmas"], tensors["lambdas"], metadata, "the fit")
    meta = {"format": FORMAT, "metadata": json.dumps(metadata, sort_keys=True)}
    with atomic_path(path) as tmp:
        # clone: views of one tensor (σ and σ[1:]) cannot be saved side by side
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_lambdas(
    path: str | Path, expect: dict[str, Any] | None = None, schedule: Schedule | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a λ file; with `expect`, refuse it unless every MATCH_KEYS field present in `expect` agrees.

    The tensors always hold the grid `sigmas` (float64, descending) the λ were fitted on, checked against the λ; an
    older file's grid is rebuilt from its metadata on `schedule` (default: the schedule its metadata describes).
    """
    return LambdaFile.read(path).load(expect, schedule)


@dataclass(frozen=True)
class LambdaFile:
    """One read of a λ file: the tensors and metadata of the bytes read, and those bytes' SHA-256.

    A run that takes several things from the file (its settings, its σ once the denoiser's schedule is known, its λ,
    the hash it records) takes them all from one read, so a file replaced meanwhile (train.py rewriting the same path)
    cannot mix two fits.
    """

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    version: str
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> LambdaFile:
        """The file's contents, refused in one line unless it is a readable λ file with valid λ and metadata. `path`
        may also be a run folder holding one λ file (`lambda_file_in`)."""
        path = lambda_file_in(path)
        if not path.is_file():
            raise LambdaFileError(f"λ file {path} does not exist: run train.py first or pass the path it printed")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LambdaFileError(f"{path} is {size / 2**20:.0f} MiB, far more than a λ file holds; pass the λ file train.py wrote")
        try:
            data = path.read_bytes()
            tensors = load_safetensors(data)
            # load() has parsed the header: 8 bytes of little-endian length, then a JSON object
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise LambdaFileError(f"{path} is not a readable λ file ({one_line(str(err), 120)}); refit with train.py") from None
        if header.get("format") not in (FORMAT, FORMAT_1) or "lambdas" not in tensors:
            raise LambdaFileError(f"{path} is not a dode-lightning λ file (format {one_line(repr(header.get('format')), 60)})")
        try:
            metadata = json.loads(header["metadata"])
        except (KeyError, ValueError, RecursionError):
            metadata = None
        if not isinstance(metadata, dict):
            raise LambdaFileError(f"{path} has no readable metadata (a JSON object under 'metadata'); refit with train.py")
        check_metadata(metadata, str(path))
        check_lambdas(tensors["lambdas"], str(path))
        return cls(path, tensors, metadata, header["format"], hashlib.sha256(data).hexdigest())

    def load(self, expect: dict[str, Any] | None = None, schedule: Schedule | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (with the checked float64 grid `sigmas`) and metadata, as `load_lambdas` gives them."""
        path, tensors, metadata = self.path, dict(self.tensors), self.metadata
        if self.version == FORMAT_1:
            if "sigmas" in tensors:
                tensors["eval_sigmas"] = tensors.pop("sigmas")
            tensors["sigmas"] = _rebuilt_grid(path, metadata, schedule)
        elif "sigmas" not in tensors:
            raise LambdaFileError(f"{path} holds no σ list (tensor 'sigmas'); refit with train.py")
        check_grid(tensors["sigmas"], tensors["lambdas"], metadata, str(path))
        tensors["sigmas"] = tensors["sigmas"].to(torch.float64)
        first = tensors.get("first_denoised")
        if first is not None and (metadata.get("first_step") != "mean" or not first.is_floating_point() or not bool(first.isfinite().all())):
            raise LambdaFileError(f"{path} holds a first-step x̂₀ (first_denoised) that is not finite or not marked first_step mean; refit with train.py")
        if expect:
            wrong = [
                f"{key}={one_line(repr(metadata.get(key)), 80)} (this run: {expect[key]!r})"
                for key in MATCH_KEYS
                if key in expect and _normalise(metadata.get(key)) != _normalise(expect[key])
            ]
            if wrong:
                raise LambdaFileError(f"{path} was fitted for another configuration: {'; '.join(wrong)}; refit with train.py")
        return tensors, metadata

    def settings(self) -> dict[str, Any]:
        """Solver, NFE, grid and grid settings the λ were fitted for (with the σ list they rebuild the student), and
        the network calls per sample (`network_nfe`: the NFE train.py was given; one less than the solver's with a
        stored first step)."""
        meta = self.metadata
        missing = [key for key in ("solver", "nfe", "grid", "grid_kwargs") if key not in meta]
        if missing:
            raise LambdaFileError(f"{self.path} lacks {', '.join(missing)} in its metadata; refit with train.py")
        return {**{key: meta[key] for key in ("solver", "nfe", "grid", "grid_kwargs")}, "network_nfe": meta.get("network_nfe", meta["nfe"])}


def lambdas_to_apply(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any], num_stages: int, image_shape: Sequence[int]
) -> Tensor:
    """The file's λ as `Solver.sample` applies them, expanded by the layout the file records (history, groups).

    A file whose λ do not have the shape its layout gives for this solver and image is refused in one line.
    """
    lambdas = tensors["lambdas"].to(torch.float64)
    try:
        layout = LambdaLayout(int(metadata.get("history", 1)), str(metadata.get("lambda_groups", "none")))
        if len(lambdas) != num_stages:
            raise ValueError(f"it holds λ for {len(lambdas)} stages, this solver has {num_stages}")
        return layout.expand(lambdas, image_shape)
    except (ValueError, TypeError) as err:  # TypeError: metadata values of the wrong JSON type
        raise LambdaFileError(f"{path}: {err}; refit with train.py") from None


def check_grid(sigmas: Tensor, lambdas: Tensor, metadata: dict[str, Any], origin: str) -> None:
    """Refuse a σ list that is not strictly decreasing or does not give the λ's stage count for the file's solver."""
    try:
        cls = SOLVERS[str(metadata.get("solver"))]
    except KeyError:
        raise LambdaFileError(f"{origin} names the unknown solver {one_line(repr(metadata.get('solver')), 40)}; refit with train.py") from None
    try:
        solver = cls(check_sigmas(sigmas))
    except (NFEError, ValueError) as err:
        raise LambdaFileError(f"{origin}: its σ list is unusable ({err}); refit with train.py") from None
    if solver.num_stages != len(lambdas):
        raise LambdaFileError(f"{origin}: its {len(sigmas)} σ give {cls.name} {solver.num_stages} stages, but it holds λ for {len(lambdas)}; refit with train.py")
    if "nfe" in metadata and metadata["nfe"] != solver.nfe:
        raise LambdaFileError(f"{origin}: its σ give {cls.name} NFE {solver.nfe}, its metadata says nfe {one_line(repr(metadata['nfe']), 20)}; refit with train.py")


def schedule_from_id(text: str) -> Schedule | None:
    """The schedule `schedule_id` describes, where its fields determine it (discrete β tables: the linear and cosine
    tables of that length); None otherwise."""
    name, brace, fields = str(text).partition("{")
    try:
        values = json.loads(brace + fields)
        candidates = {
            "EDM": lambda: [EDM(values["t_min"], values["t_max"])],
            "VE": lambda: [VE(values["t_min"] ** 0.5, values["t_max"] ** 0.5)],
            "VPContinuous": lambda: [VPContinuous(values["beta_d"], values["beta_min"], values["t_min"])],
            "VPDiscrete": lambda: [VPDiscrete(betas(int(values["num_timesteps"]))) for betas in (linear_betas, cosine_betas)],
            "FlowMatching": lambda: [FlowMatching(values["shift"], values.get("mu"), values["time_shift_type"], values["num_train_timesteps"])],
        }[name]()
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return next((schedule for schedule in candidates if schedule_id(schedule) == text), None)


def _rebuilt_grid(path: Path, metadata: dict[str, Any], schedule: Schedule | None) -> Tensor:
    """The grid an older (format 1) λ file was fitted on, from its solver, NFE and grid settings."""
    if schedule is None or schedule_id(schedule) != metadata.get("schedule"):
        schedule = schedule_from_id(metadata.get("schedule", ""))
    if schedule is None:
        raise LambdaFileError(f"{path} is an older λ file without its σ list, and its schedule {one_line(repr(metadata.get('schedule')), 60)} cannot be rebuilt; refit with train.py")
    try:
        setup = SolverSetup.resolve(str(metadata["solver"]), int(metadata["nfe"]), schedule, metadata.get("grid"), **dict(metadata.get("grid_kwargs") or {}))
        return setup.build().sigmas
    except (KeyError, NFEError, ValueError, TypeError) as err:
        raise LambdaFileError(f"{path} is an older λ file without its σ list, and its grid cannot be rebuilt ({one_line(str(err), 100)}); refit with train.py") from None


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def lambda_file_in(path: str | Path) -> Path:
    """`path` itself, or the one λ file (`*.safetensors`) in a run folder such as the one train.py names."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "*.safetensors"
        raise LambdaFileError(f"folder {path} holds {len(found)} λ files ({listed}); pass the λ file itself")
    return found[0]


def refuse_first_step(tensors: dict[str, Tensor], path: str | Path, driver: str) -> None:
    """One line for a `first_step: mean` λ file where `driver` calls the network at every step."""
    if "first_denoised" in tensors:
        raise LambdaFileError(
            f"{path} answers its first evaluation with a stored x̂₀ (first_step: mean), which {driver} cannot do; "
            "sample it with sample.py, dode_lightning.load_student or the k-diffusion / ComfyUI sampler, or refit with --model.first_step network"
        )
