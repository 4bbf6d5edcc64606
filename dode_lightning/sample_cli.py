"""Command-line entry of sampling (`sample.py`) and of reference statistics (`sample.py fid-ref`); docs/sampling.md.

The run config is the calibration config: its `trainer` section (devices, strategy, num_nodes, logger, …) builds the
Trainer through LightningCLI, and the sampling-relevant keys of its `model` section build `DODESampler`; the
calibration-only keys (fit, adam_*, output) and the `data` section (except `class_conditional`) are ignored.
Dotted overrides work as in train.py for those sections: `--trainer.devices 2 --model.nfe 5`.
"""
from __future__ import annotations

import argparse
import inspect
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .atomic import atomic_path
from .checkpoints import CheckpointError
from .fid import Detector, FIDCallback, Reference, image_files, iter_image_batches, load_detector, load_reference_npz, make_metric, metric_stats, save_reference
from .lambda_file import LambdaFileError
from .lightning import ConfigError, DODECalibration, limit_threads_for_builtin
from .sampling import (
    MANIFEST,
    MANIFEST_FORMAT,
    PredictTimer,
    DODESampler,
    ImageStore,
    SampleWriter,
    SeedData,
    format_seeds,
    parse_seeds,
    union_seeds,
    read_manifest,
)

__all__ = ["sample_main", "fid_ref_main", "export_scheduler_main", "SAMPLING_TRAINER_DEFAULTS"]

SAMPLING_TRAINER_DEFAULTS: dict[str, Any] = {
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "sampling", "default_hp_metric": False},
    },
}
# Keys the config's `model` section may hold for calibration that do not change how a seed is sampled.
_SAMPLER_KEYS = [name for name in inspect.signature(DODESampler.__init__).parameters if name not in ("self", "lambdas", "class_conditional", "eval_batch")]
_CALIBRATION_ONLY = [name for name in inspect.signature(DODECalibration.__init__).parameters if name not in ("self", *_SAMPLER_KEYS)]
_EXPECTED = (ConfigError, LambdaFileError, CheckpointError, FileNotFoundError, ImportError)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample a D-ODE (or base) solver for a range of seeds through trainer.predict; optional FID.",
        epilog="Dotted overrides of the config: --trainer.devices 2 --trainer.strategy ddp --model.nfe 5. "
        "Reference statistics from a folder: python sample.py fid-ref --images DIR --out ref.npz. "
        "A diffusers scheduler folder from a λ file: python sample.py export-scheduler --lambdas F --pipeline DIR --out DIR.",
    )
    parser.add_argument("--config", required=True, help="run config (the one train.py used)")
    parser.add_argument("--lambdas", required=True, help="λ file from train.py, or 'none' for the base solver")
    parser.add_argument("--seeds", required=True, help="inclusive ranges, e.g. 0-49999 or 0,10-19")
    parser.add_argument("--outdir", required=True, help="output folder (rerunning the same command resumes)")
    parser.add_argument("--batch-size", type=int, default=64, help="seeds per predict batch and rank (default 64)")
    parser.add_argument("--eval-batch", type=int, default=64, help="samples per network call, padded (default 64); images are bit-identical for any --batch-size and world size at the same --eval-batch")
    parser.add_argument("--format", choices=("png", "npz", "both"), default="png", help="PNG files, npz shards, or both")
    parser.add_argument("--fid", action="store_true", help="compute FID of the seeds against --fid-ref")
    parser.add_argument("--fid-ref", help="reference: EDM-style npz (mu, sigma), a folder of images, or 'exact' (built-in model)")
    parser.add_argument("--fid-detector", help="inception | inception:<file> | pixels | <TorchScript file> | <module>:<factory> (default: pixels for the built-in model, else inception)")
    parser.add_argument("--fid-weights", help="state_dict for a <module>:<factory> detector")
    parser.add_argument("--fid-ref-count", type=int, default=10_000, help="exact samples for --fid-ref exact (default 10000)")
    return parser


def _overrides(rest: list[str]) -> dict[str, dict[str, Any]]:
    """`--trainer.devices 2`, `--model.denoiser.path x`, `--data.class_conditional=true` → nested dicts (YAML values)."""
    out: dict[str, dict[str, Any]] = {"trainer": {}, "model": {}, "data": {}}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; see python sample.py --help")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], rest[i + 1]
            i += 2
        section, *path = key.split(".")
        if section not in out:
            raise ConfigError(f"unknown override {arg!r}: only --trainer.*, --model.* and --data.* are accepted")
        target = out[section]
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_config(path: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config {file} not found")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {file} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config {file} must be a mapping with trainer/model/data sections")
    for section, values in overrides.items():
        config[section] = _merge(config.get(section) or {}, values)
    return config


def _model_args(config: dict[str, Any], lambdas: str, eval_batch: int) -> dict[str, Any]:
    model = dict(config.get("model") or {})
    unknown = sorted(set(model) - set(_SAMPLER_KEYS) - set(_CALIBRATION_ONLY))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in the model section; accepted: {', '.join(_SAMPLER_KEYS + _CALIBRATION_ONLY)}")
    args = {k: v for k, v in model.items() if k in _SAMPLER_KEYS}
    args["lambdas"] = None if lambdas.lower() == "none" else lambdas
    args["eval_batch"] = eval_batch
    conditional = (config.get("data") or {}).get("class_conditional")
    if conditional is not None:
        args["class_conditional"] = conditional
    return args


def check_writable(outdir: Path) -> None:
    """The folder (or its nearest existing ancestor) accepts a file; creates nothing that stays."""
    target = outdir
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise ConfigError(f"output directory {outdir} cannot be created: {target} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-", suffix=".tmp"):
            pass
    except OSError as err:
        raise ConfigError(f"output directory {outdir} is not writable ({err.strerror}); choose another --outdir") from None


def _reference(spec: str, detector_features: int, is_builtin: bool, conditional: bool, count: int) -> Reference:
    if spec == "exact":
        if not is_builtin:
            raise ConfigError("--fid-ref exact is only available for the built-in gmm_digits model")
        if count < 2:
            raise ConfigError(f"--fid-ref-count must be ≥ 2, got {count}")
        return Reference("exact", count=count, class_conditional=conditional)
    path = Path(spec)
    if path.is_dir():
        return Reference("folder", path=path, files=image_files(path))
    if path.is_file():
        return Reference("npz", path=path, stats=load_reference_npz(path, detector_features))
    raise ConfigError(f"FID reference {path} not found: give an npz with mu/sigma, a folder of images, or 'exact'")


def _manifest(args: argparse.Namespace, config: dict[str, Any], module: DODESampler, previous: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "identity": module.identity(),
        "config": {"path": str(Path(args.config).resolve()), "model": config.get("model"), "trainer": config.get("trainer")},
        "lambda_file": module.lambda_file,
        "image_shape": list(module.image_shape),
        "seeds": union_seeds(args.seeds, *([previous["seeds"]] if previous else [])),
        "last_command": {"seeds": args.seeds, "format": args.format, "batch_size": args.batch_size, "eval_batch": args.eval_batch},
    }


def sample_main(argv: list[str] | None = None) -> int:
    """`python sample.py --config x.yaml --lambdas <file|none> --seeds 0-49999 --outdir DIR [...]`; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fid-ref"]:
        return fid_ref_main(argv[1:])
    if argv[:1] == ["export-scheduler"]:
        return export_scheduler_main(argv[1:])
    args, rest = _parser().parse_known_args(argv)
    started = time.perf_counter()
    try:
        config = _read_config(args.config, _overrides(rest))
        seeds = parse_seeds(args.seeds)
        outdir = Path(args.outdir)
        check_writable(outdir)
        store = ImageStore(outdir, args.format)
        store.check_layout(seeds, [MANIFEST, "metrics.json"])
        model_args = _model_args(config, args.lambdas, args.eval_batch)
        want_fid = args.fid or args.fid_ref is not None
        if want_fid and args.fid_ref is None:
            raise ConfigError("--fid needs reference statistics: --fid-ref <npz|folder> (or 'exact' for the built-in model)")
        trainer_cfg = {**(config.get("trainer") or {}), "use_distributed_sampler": True}
        data = SeedData(seeds, store, args.batch_size, load_written=want_fid)
        with warnings.catch_warnings():
            # Our own argv is not the CLI's: the config reaches LightningCLI as a dict on purpose.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = LightningCLI(
                DODESampler,
                run=False,
                args={"trainer": trainer_cfg, "model": model_args},
                trainer_defaults=SAMPLING_TRAINER_DEFAULTS,
                save_config_callback=None,
                seed_everything_default=False,
            )
        module, trainer = cli.model, cli.trainer
        limit_threads_for_builtin(module.built.loaded, trainer.strategy.root_device)
        processes = trainer.num_devices * trainer.num_nodes
        if len(seeds) < processes:
            # A rank without batches skips predict's hooks, and the others would wait for it at the barriers.
            raise ConfigError(f"{len(seeds)} seed(s) for {processes} processes: give at least one seed per process")
        # The FID detector needs the model's image shape, so the callbacks join the trainer after the CLI built both.
        timer = PredictTimer()
        callbacks: list[Any] = [timer]
        previous = read_manifest(outdir)
        if previous is not None and previous["identity"] != module.identity():
            changed = sorted(k for k in set(previous["identity"]) | set(module.identity()) if previous["identity"].get(k) != module.identity().get(k))
            raise ConfigError(f"{outdir} holds samples of another configuration (differs in {', '.join(changed)}); choose another --outdir")
        fid = None
        if want_fid:
            is_builtin = module.built.loaded.source == "gmm_digits"
            detector = load_detector(args.fid_detector or ("pixels" if is_builtin else "inception"), module.image_shape, args.fid_weights)
            reference = _reference(args.fid_ref, detector.num_features, is_builtin, module.label_dim > 0, args.fid_ref_count)
            fid = FIDCallback(detector, reference, outdir, args.batch_size, extra={"seeds": format_seeds(seeds)})
            callbacks.append(fid)
        writer = SampleWriter(store, _manifest(args, config, module, previous))
        callbacks.append(writer)
    except _EXPECTED as err:
        return _fail(str(err))
    for callback in callbacks:
        trainer.callbacks.append(callback)
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
    except ConfigError as err:
        return _fail(str(err))
    except SIGTERMException:
        print(f"error: stopped by SIGTERM after {writer.written} new image(s); rerun the same command to finish {outdir}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as err:
        # Disk full, a quota, a folder that vanished: what was written is whole (atomic writes) and a rerun resumes.
        reason = f"{err.strerror or type(err).__name__}{f': {err.filename}' if err.filename else ''}"
        return _fail(f"writing the samples failed ({reason}); {writer.written} new image(s) are kept, fix that and rerun the same command to resume")
    finally:
        store.unlock()
    if trainer.global_rank != 0:
        return 0
    fresh, seconds = len(seeds) - data.already_written, timer.seconds
    rate = f", {fresh / seconds:.1f} images/s" if fresh else ""
    kind = "base solver" if module.lambda_file is None else f"D-solver (λ {module.lambda_file['path']})"
    print(f"\n{module.built.setup.name}, NFE {module.student.nfe}, {kind}")
    print(f"{len(seeds)} seeds ({args.seeds}): {fresh} generated on {trainer.world_size} process(es), {data.already_written} already in {outdir}; predict {seconds:.2f} s{rate}; total {time.perf_counter() - started:.2f} s")
    if fid is not None:
        print(f"{fid.detector.metric_name}: {fid.value:.6g} (n = {fid.num_generated}, reference {fid.reference.describe()}); {outdir / 'metrics.json'}")
    return 0


def fid_ref_main(argv: list[str] | None = None) -> int:
    """`python sample.py fid-ref --images DIR --out ref.npz [--detector inception]`: μ, Σ (n − 1), n of a folder."""
    parser = argparse.ArgumentParser(prog="sample.py fid-ref", description="Reference FID statistics (EDM-style npz) from a folder of images.")
    parser.add_argument("--images", required=True, help="folder of PNG/JPEG images (searched recursively)")
    parser.add_argument("--out", required=True, help="npz to write (mu, sigma, n, detector)")
    parser.add_argument("--detector", default="inception", help="inception | inception:<file> | pixels | <TorchScript file> | <module>:<factory>")
    parser.add_argument("--weights", help="state_dict for a <module>:<factory> detector")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        folder = Path(args.images)
        if not folder.is_dir():
            raise ConfigError(f"image folder {folder} not found")
        files = image_files(folder)
        out = Path(args.out)
        check_writable(out.parent)
        first = next(iter_image_batches(files[:1]))
        detector = load_detector(args.detector, tuple(first.shape[1:]), args.weights)
        statistics = reference_stats(files, detector, args.batch_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_reference(out, *statistics, detector=detector.name)
    except _EXPECTED as err:
        return _fail(str(err))
    print(f"{out}: mu {tuple(statistics[0].shape)}, sigma {tuple(statistics[1].shape)}, n = {statistics[2]}, detector {detector.name}")
    return 0


def export_scheduler_main(argv: list[str] | None = None) -> int:
    """`python sample.py export-scheduler --lambdas F --pipeline DIR --out DIR`: a `DODEScheduler` folder."""
    parser = argparse.ArgumentParser(
        prog="sample.py export-scheduler",
        description="Write the calibrated D-solver of a λ file as a diffusers scheduler folder (DODEScheduler, scheduler_config.json).",
    )
    parser.add_argument("--lambdas", required=True, help="λ file from train.py (fitted on a diffusers pipeline folder)")
    parser.add_argument("--pipeline", required=True, help="the diffusers pipeline folder the λ were fitted on (supplies the β table)")
    parser.add_argument("--out", required=True, help="folder to write scheduler_config.json into")
    parser.add_argument("--integer-timesteps", action="store_true", help="the calibration's denoiser used integer_timesteps: true")
    args = parser.parse_args(argv)
    try:
        try:
            from .diffusers_scheduler import SchedulerConfigError, export_scheduler
        except ImportError:
            raise ImportError("export-scheduler needs the optional dependency diffusers: pip install 'dode-lightning[diffusers]'") from None
        out = Path(args.out)
        check_writable(out)
        try:
            scheduler = export_scheduler(args.lambdas, args.pipeline, integer_timesteps=args.integer_timesteps)
        except SchedulerConfigError as err:
            raise ConfigError(str(err)) from None
        with atomic_path(out / scheduler.config_name) as tmp:
            scheduler.to_json_file(tmp)
    except _EXPECTED as err:
        return _fail(str(err))
    config = scheduler.config
    print(f"{out / scheduler.config_name}: D-{config.solver}, NFE {config.nfe} (num_inference_steps={scheduler.calibrated_steps}), {len(config.lambdas)} λ")
    print(f"use it: pipe.scheduler = DODEScheduler.from_pretrained({str(out)!r})  (from dode_lightning import DODEScheduler)")
    return 0


def reference_stats(files: list[Path], detector: Detector, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(μ, Σ, n) of the detector's features over image files, through the same torchmetrics states as the FID."""
    metric = make_metric(detector)
    with torch.no_grad():
        for images in iter_image_batches(files, batch_size):
            metric.update(images, real=True)
    return metric_stats(metric, real=True)
