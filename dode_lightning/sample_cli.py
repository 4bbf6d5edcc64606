"""Command-line entry of sampling (`sample.py`) and of reference statistics (`sample.py fid-ref`); docs/sampling.md.

The run config is the calibration config: its `trainer` section (devices, strategy, num_nodes, …) builds the
Trainer through LightningCLI, and the sampling-relevant keys of its `model` section build `DODESampler`; the
calibration-only keys (fit, adam_*, output) and the `data` section (except `class_conditional`) are ignored.
Solver, NFE and grid come from the λ file when one is given. Dotted overrides work as in train.py for those
sections: `--trainer.devices 2 --model.nfe 5`. `sample.py fid` scores an existing folder against a reference.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import yaml

from .atomic import atomic_path
from .checkpoints import CheckpointError, config_relative
from .cli_common import Interrupted, forget_run_version, one_line, run_until_stopped, tensorboard_command, unique_version
from .errors import ConfigError
from .fid import (
    BUILTIN_IMAGE_SHAPE,
    Detector,
    Reference,
    check_detector_match,
    clamped_fid,
    default_detector,
    image_files,
    iter_image_batches,
    load_detector,
    load_reference_npz,
    load_reference_side,
    make_metric,
    metric_stats,
    reference_detector,
    sample_count_warning,
    save_reference,
    verify_images,
)
from .images import GRID_FILE, GRID_SEEDS, MANIFEST
from .lambda_file import LambdaFile, LambdaFileError, lambda_file_in
from .quiet import silence_lightning_noise

if TYPE_CHECKING:  # Lightning is imported only by the commands that sample (start-up time of the others)
    from pytorch_lightning.loggers import TensorBoardLogger

    from .sampling import SampleWriter

    from .sampling import DODESampler

__all__ = ["sample_main", "fid_ref_main", "fid_main", "export_scheduler_main", "SAMPLING_TRAINER_DEFAULTS"]

SAMPLING_TRAINER_DEFAULTS: dict[str, Any] = {
    "enable_checkpointing": False,
    "enable_model_summary": False,
}
# TensorBoard runs of sample.py go under <save_dir>/SAMPLING_RUNS, apart from the calibration runs, and only with FID.
SAMPLING_RUNS = "sampling"
# Model keys a λ file fixes (it was fitted for exactly these).
_FITTED_KEYS = ("solver", "nfe", "grid", "sigma_min", "sigma_max", "rho", "terminal_zero")
# The `model` keys DODESampler takes from the config (its arguments but lambdas, class_conditional, eval_batch), and
# those DODECalibration takes besides, which do not change how a seed is sampled. Written out so that --help and
# --print_config need no Lightning import; tests/test_startup.py checks them against both signatures.
SAMPLER_KEYS = ("denoiser", "solver", "nfe", "grid", "sigma_min", "sigma_max", "rho", "terminal_zero", "state_dtype")
CALIBRATION_ONLY_KEYS = (
    "fit", "adam_lr", "adam_steps", "output", "history", "lambda_groups", "guard",
    "joint_optimizer", "joint_steps", "joint_lr", "joint_coordinate", "joint_lambdas", "joint_intermediate", "joint_slack", "joint_refit",
    "joint_pool", "joint_hard", "first_step",
    "dp_steps", "dp_coefficient", "dp_seeds",
)
# A few Trainer arguments named in --help (any other works too).
_TRAINER_EXAMPLES = "accelerator, strategy, devices, num_nodes, precision, logger, callbacks, default_root_dir"
_EXPECTED = (ConfigError, LambdaFileError, CheckpointError, FileNotFoundError, ImportError)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (via ConfigError) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see python {self.prog} --help")


_DETECTOR_HELP = (
    "inception | inception:<file> | pixels | <TorchScript file> | <module>:<factory> (default: the detector the "
    "reference npz records; else pixels for the built-in model's 1×8×8 images, inception otherwise)"
)


def _add_fid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fid-detector", help=_DETECTOR_HELP)
    parser.add_argument("--fid-weights", help="state_dict for a <module>:<factory> detector")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sample.py",
        allow_abbrev=False,
        description="Sample a D-ODE (or base) solver for a range of seeds through trainer.predict; optional FID.",
        epilog="Reference statistics from a folder: python sample.py fid-ref --images DIR --out ref.npz. "
        "FID of an existing folder: python sample.py fid --images DIR --fid-ref REF. "
        "A diffusers scheduler folder from a λ file: python sample.py export-scheduler --lambdas F --pipeline DIR --out DIR.",
    )
    parser.add_argument("--config", required=True, help="run config (the one train.py used)")
    parser.add_argument("--lambdas", required=True, help="λ file from train.py, or the run folder holding it (solver, NFE and grid are taken from it), or 'none' for the base solver")
    parser.add_argument("--seeds", required=True, help="inclusive ranges, e.g. 0-49999 or 0,10-19")
    parser.add_argument("--outdir", required=True, help="output folder (rerunning the same command resumes)")
    parser.add_argument("--batch-size", type=int, default=64, help="seeds per predict batch and rank (default 64)")
    parser.add_argument("--eval-batch", type=int, default=64, help="samples per network call, padded (default 64); images are bit-identical for any --batch-size and world size at the same --eval-batch")
    parser.add_argument("--format", choices=("png", "npz", "both"), default="png", help="PNG files, npz shards, or both")
    parser.add_argument("--fid", action="store_true", help="compute FID of the seeds against --fid-ref")
    parser.add_argument("--fid-ref", help="reference: EDM-style npz (mu, sigma), a folder of images, or 'exact' (built-in model)")
    _add_fid_options(parser)
    parser.add_argument("--fid-ref-count", type=int, default=10_000, help="exact samples for --fid-ref exact (default 10000)")
    parser.add_argument("--print_config", action="store_true", help="print the effective trainer/model/data sections (after overrides and the λ file) as YAML and exit")
    overrides = parser.add_argument_group(
        "config overrides",
        "Dotted keys of the config's sections, as in train.py: --model.KEY VALUE (denoiser, state_dtype, …; solver, nfe, "
        "grid come from the λ file), --data.class_conditional true|false, and --trainer.KEY VALUE for any argument of "
        f"pytorch_lightning.Trainer: {_TRAINER_EXAMPLES}, ….",
    )
    overrides.add_argument("--trainer.KEY", metavar="VALUE", dest="_trainer_help", help="e.g. --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator gpu")
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
    if isinstance(config.get("model"), dict) and "denoiser" in config["model"]:
        config["model"]["denoiser"] = config_relative(config["model"]["denoiser"], file.parent)
    for section, values in overrides.items():
        config[section] = _merge(config.get(section) or {}, values)
    return config


def _model_args(config: dict[str, Any], lambdas: str, eval_batch: int, command_line: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """DODESampler's arguments, and the SHA-256 of the λ file read for them (None without one); with a λ file,
    solver, NFE and grid are the file's (a different value given on the command line is refused, one in the config
    file is replaced)."""
    model = dict(config.get("model") or {})
    unknown = sorted(set(model) - set(SAMPLER_KEYS) - set(CALIBRATION_ONLY_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in the model section; accepted: {', '.join(SAMPLER_KEYS + CALIBRATION_ONLY_KEYS)}")
    args = {k: v for k, v in model.items() if k in SAMPLER_KEYS}
    args["lambdas"] = None if lambdas.lower() == "none" else str(lambda_file_in(lambdas))
    digest = None
    if args["lambdas"] is not None:
        fitted_file = LambdaFile.read(args["lambdas"])
        fitted, digest = fitted_file.settings(), fitted_file.sha256
        values = {"solver": fitted["solver"], "nfe": fitted["nfe"], "grid": fitted["grid"], **{k: v for k, v in fitted["grid_kwargs"].items() if k in _FITTED_KEYS}}
        given = {**values, "nfe": fitted["network_nfe"]}  # what train.py was told (with a stored first step, one less)
        for key in _FITTED_KEYS:
            if key in command_line and key in given and command_line[key] != given[key]:
                raise ConfigError(f"--model.{key} {command_line[key]} conflicts with the λ file, fitted with {key} {given[key]}; drop the override, refit, or use --lambdas none")
            args.pop(key, None)
        args.update(values)
    args["eval_batch"] = eval_batch
    conditional = (config.get("data") or {}).get("class_conditional")
    if conditional is not None:
        args["class_conditional"] = conditional
    return args, digest


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


def resolve_fid(
    spec: str, detector_spec: str | None, weights: str | None, image_shape: tuple[int, ...], conditional: bool = False, count: int = 10_000
) -> tuple[Detector, Reference]:
    """The detector (`--fid-detector`, else the one default rule) and the validated reference, before anything runs.

    An npz recording another detector is refused; a folder's images are checked whole; `exact` needs the built-in
    model's images.
    """
    path = Path(spec)
    recorded, recorded_spec = reference_detector(path) if spec != "exact" and path.is_file() else (None, None)
    detector = load_detector(detector_spec or default_detector(image_shape, recorded_spec), image_shape, weights)
    if spec == "exact":
        if tuple(image_shape) != BUILTIN_IMAGE_SHAPE:
            raise ConfigError("--fid-ref exact is only available for the built-in gmm_digits model")
        if count < 2:
            raise ConfigError(f"--fid-ref-count must be ≥ 2, got {count}")
        return detector, Reference("exact", count=count, class_conditional=conditional)
    if path.is_dir():
        files = image_files(path)
        verify_images(files)
        return detector, Reference("folder", path=path, files=files)
    if path.is_file():
        check_detector_match(path, recorded, detector)
        return detector, Reference("npz", path=path, stats=load_reference_npz(path, detector.num_features))
    raise ConfigError(f"FID reference {path} not found: give an npz with mu/sigma, a folder of images, or 'exact'")


def _warn(message: str | None) -> None:
    if message:
        print(message, file=sys.stderr)


def _sampling_logger(config: dict[str, Any], module: DODESampler) -> TensorBoardLogger | None:
    """TensorBoard under <save_dir>/sampling/<solver>_nfe<N>_<d|base>[_k] (N: network calls per sample), apart from
    the calibration runs (save_dir from the config's logger, default runs); none when the config turns logging off."""
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = (config.get("trainer") or {}).get("logger", True)
    if logger in (False, None):
        return None
    save_dir = (logger.get("init_args") or {}).get("save_dir", "runs") if isinstance(logger, dict) else "runs"
    kind = "base" if module.lambda_file is None else "d"
    version = unique_version(Path(save_dir) / SAMPLING_RUNS, f"{module.built.setup.name}_nfe{module.network_nfe}_{kind}")
    return TensorBoardLogger(save_dir=save_dir, name=SAMPLING_RUNS, version=version, default_hp_metric=False)


def _manifest(args: argparse.Namespace, config: dict[str, Any], module: DODESampler, previous: dict[str, Any] | None) -> dict[str, Any]:
    from .sampling import MANIFEST_FORMAT, union_seeds

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
    """`python sample.py --config x.yaml --lambdas <file|none> --seeds 0-49999 --outdir DIR [...]`; the exit code.

    SIGINT and SIGTERM stop any command at once, with one line and exit code 130 / 143: every file is written
    atomically, so what is on disk is whole and a rerun of the same command resumes; an FID run's unfinished
    TensorBoard run folder is removed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"fid-ref": fid_ref_main, "export-scheduler": export_scheduler_main, "fid": fid_main}
    forget_run_version()
    progress: dict[str, Any] = {}

    def run() -> int:
        return commands[argv[0]](argv[1:]) if argv[:1] and argv[0] in commands else _sample(argv, progress)

    return run_until_stopped(run, lambda stop: _stopped(stop, progress), lambda code: code == 0)


def _stopped(stop: Interrupted, progress: dict[str, Any]) -> str:
    writer: SampleWriter | None = progress.get("writer")
    if writer is None:
        return f"stopped by {stop.name} before anything was written; rerun the same command"
    return f"stopped by {stop.name} after {writer.written} new image(s); every file is whole: rerun the same command to finish {writer.store.outdir}"


def _sample(argv: list[str], progress: dict[str, Any]) -> int:
    """sample.py's sampling run; records its `SampleWriter` (`writer`) in `progress`."""
    silence_lightning_noise()
    started = time.perf_counter()
    try:
        args, rest = _parser().parse_known_args(argv)
        command_line = _overrides(rest)
        config = _read_config(args.config, command_line)
        model_args, checked_digest = _model_args(config, args.lambdas, args.eval_batch, command_line["model"])
        if args.print_config:
            data_section = {k: v for k, v in (config.get("data") or {}).items() if k == "class_conditional"}
            print(yaml.safe_dump({"trainer": config.get("trainer") or {}, "model": model_args, "data": data_section}, sort_keys=False, allow_unicode=True), end="")
            return 0
        # Sampling proper: Lightning from here on.

        from .cli import CheckedTrainerCLI
        from .lightning import limit_threads_for_builtin
        from .sampling import DODESampler, FIDCallback, ImageStore, PredictTimer, RankWatchdog, SampleWriter, SeedData, format_seeds, parse_seeds, read_manifest, write_grid

        seeds = parse_seeds(args.seeds)
        outdir = Path(args.outdir)
        check_writable(outdir)
        store = ImageStore(outdir, args.format)
        store.check_layout(seeds, [MANIFEST, "metrics.json", GRID_FILE])
        want_fid = args.fid or args.fid_ref is not None
        if want_fid and args.fid_ref is None:
            raise ConfigError("--fid needs reference statistics: --fid-ref <npz|folder> (or 'exact' for the built-in model)")
        # Sampling logs nothing unless FID is asked for; its logger is attached below, under its own name.
        trainer_cfg = {**(config.get("trainer") or {}), "use_distributed_sampler": True, "logger": False}
        data = SeedData(seeds, store, args.batch_size, load_written=want_fid)
        with warnings.catch_warnings():
            # Our own argv is not the CLI's: the config reaches LightningCLI as a dict on purpose.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = CheckedTrainerCLI(
                DODESampler,
                run=False,
                args={"trainer": trainer_cfg, "model": model_args},
                trainer_defaults=SAMPLING_TRAINER_DEFAULTS,
                save_config_callback=None,
                seed_everything_default=False,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
        module, trainer = cli.model, cli.trainer
        if checked_digest is not None and module.lambda_file["sha256"] != checked_digest:
            # The settings checked against the command line came from another file than the one the sampler read.
            raise ConfigError(f"λ file {model_args['lambdas']} changed while sample.py started (train.py still writing it?); rerun once it is written")
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
            detector, reference = resolve_fid(args.fid_ref, args.fid_detector, args.fid_weights, module.image_shape, module.label_dim > 0, args.fid_ref_count)
            if trainer.global_rank == 0:
                _warn(sample_count_warning(len(seeds), detector.num_features))
            fid = FIDCallback(detector, reference, outdir, args.batch_size, extra={"seeds": format_seeds(seeds)})
            callbacks.append(fid)
            trainer.logger = _sampling_logger(config, module)
        writer = SampleWriter(store, _manifest(args, config, module, previous))
        callbacks.append(writer)
    except argparse.ArgumentError as err:
        return _fail(f"{one_line(str(err))}; see python sample.py --help")
    except _EXPECTED as err:
        return _fail(str(err))
    progress["writer"] = writer
    callbacks.append(RankWatchdog())  # last, so that it watches through the other callbacks' collectives at the end
    for callback in callbacks:
        trainer.callbacks.append(callback)
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
        grid = write_grid(store, seeds, module.image_shape) if trainer.global_rank == 0 else None  # while the folder is still locked
    except ConfigError as err:
        return _fail(str(err))
    except OSError as err:
        # Disk full, a quota, a folder that vanished: what was written is whole (atomic writes) and a rerun resumes.
        # A failed rename (atomic write) names the hidden temporary first and the image it was to become second.
        path = err.filename2 or err.filename
        reason = f"{err.strerror or type(err).__name__}{f': {path}' if path else ''}"
        return _fail(f"writing the samples failed ({reason}); {writer.written} new image(s) are kept, fix that and rerun the same command to resume")
    finally:
        store.unlock()
    if grid is None:
        return 0
    if trainer.logger is not None:
        trainer.logger.experiment.add_image("samples/grid", torch.from_numpy(grid), global_step=0, dataformats="HWC")
        trainer.logger.save()
    fresh, seconds = len(seeds) - data.already_written, timer.seconds
    rate = f", {fresh / seconds:.1f} images/s" if fresh else ""
    kind = "base solver" if module.lambda_file is None else f"D-solver (λ {module.lambda_file['path']})"
    nfe = module.network_nfe if module.network_nfe == module.student.nfe else f"{module.network_nfe} (+ the stored first step)"
    print(f"\n{module.built.setup.name}, NFE {nfe}, {kind}")
    print(f"{len(seeds)} seeds ({args.seeds}): {fresh} generated on {trainer.world_size} process(es), {data.already_written} already in {outdir}; predict {seconds:.2f} s{rate}; total {time.perf_counter() - started:.2f} s")
    print(f"image grid of the first {min(len(seeds), GRID_SEEDS)} seeds: {outdir / GRID_FILE}")
    if fid is not None:
        print(f"{fid.detector.metric_name}: {fid.value:.6g} (n = {fid.num_generated}, reference {fid.reference.describe()}); {outdir / 'metrics.json'}")
        if trainer.logger is not None:
            print(f"TensorBoard: {tensorboard_command(trainer.logger.save_dir)}  (run {SAMPLING_RUNS}/{trainer.logger.version})")
    return 0


def fid_ref_main(argv: list[str] | None = None) -> int:
    """`python sample.py fid-ref --images DIR --out ref.npz [--fid-detector …]`: μ, Σ (n − 1), n of a folder."""
    parser = _Parser(prog="sample.py fid-ref", allow_abbrev=False, description="Reference FID statistics (EDM-style npz) from a folder of images.")
    parser.add_argument("--images", required=True, help="folder of PNG/JPEG images (searched recursively)")
    parser.add_argument("--out", required=True, help="npz to write (mu, sigma, n, detector)")
    _add_fid_options(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    try:
        args = parser.parse_args(argv)
        files = _folder_images(args.images)
        out = Path(args.out)
        check_writable(out.parent)
        detector = load_detector(args.fid_detector or default_detector(_image_shape(files[0])), _image_shape(files[0]), args.fid_weights)
        _warn(sample_count_warning(len(files), detector.num_features))
        statistics = reference_stats(files, detector, args.batch_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_reference(out, *statistics, detector=detector)
    except _EXPECTED as err:
        return _fail(str(err))
    print(f"{out}: mu {tuple(statistics[0].shape)}, sigma {tuple(statistics[1].shape)}, n = {statistics[2]}, detector {detector.name} ({detector.identity})")
    return 0


def export_scheduler_main(argv: list[str] | None = None) -> int:
    """`python sample.py export-scheduler --lambdas F --pipeline DIR --out DIR`: a `DODEScheduler` folder."""
    parser = _Parser(
        prog="sample.py export-scheduler",
        allow_abbrev=False,
        description="Write the calibrated D-solver of a λ file as a diffusers scheduler folder (DODEScheduler, scheduler_config.json).",
    )
    parser.add_argument("--lambdas", required=True, help="λ file from train.py, or the run folder holding it (fitted on a diffusers pipeline folder)")
    parser.add_argument("--pipeline", required=True, help="the diffusers pipeline folder the λ were fitted on (supplies the β table)")
    parser.add_argument("--out", required=True, help="folder to write scheduler_config.json into")
    parser.add_argument("--integer-timesteps", action="store_true", help="the calibration's denoiser used integer_timesteps: true")
    try:
        args = parser.parse_args(argv)
        try:
            from .diffusers_scheduler import SchedulerConfigError, export_scheduler
        except ImportError:
            raise ImportError("export-scheduler needs the optional dependency diffusers: pip install 'dode-lightning[diffusers]'") from None
        out = Path(args.out)
        check_writable(out)
        try:
            scheduler = export_scheduler(lambda_file_in(args.lambdas), args.pipeline, integer_timesteps=args.integer_timesteps)
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


def fid_main(argv: list[str] | None = None) -> int:
    """`python sample.py fid --images DIR --fid-ref REF`: FID of an existing folder of images (EDM's `fid.py calc`)."""
    parser = _Parser(prog="sample.py fid", allow_abbrev=False, description="FID of a folder of images against a reference (npz, folder, or 'exact' for the built-in model).")
    parser.add_argument("--images", required=True, help="folder of generated images (searched recursively; a sample.py grid.png is skipped)")
    parser.add_argument("--fid-ref", required=True, help="EDM-style npz (mu, sigma), a folder of images, or 'exact'")
    _add_fid_options(parser)
    parser.add_argument("--fid-ref-count", type=int, default=10_000, help="exact samples for --fid-ref exact (default 10000)")
    parser.add_argument("--batch-size", type=int, default=64)
    try:
        args = parser.parse_args(argv)
        files = _folder_images(args.images)
        shape = _image_shape(files[0])
        detector, reference = resolve_fid(args.fid_ref, args.fid_detector, args.fid_weights, shape, count=args.fid_ref_count)
        _warn(sample_count_warning(len(files), detector.num_features))
        metric = make_metric(detector)
        load_reference_side(metric, reference, args.batch_size)
        with torch.no_grad():
            for images in iter_image_batches(files, args.batch_size, "images"):
                metric.update(images, real=False)
        value = clamped_fid(metric)
    except _EXPECTED as err:
        return _fail(str(err))
    print(f"{detector.metric_name}: {value:.6g} (n = {len(files)}, reference {reference.describe()})")
    return 0


def _folder_images(folder: str) -> list[Path]:
    """The image files of a folder, each checked to be a whole image."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"image folder {path} not found")
    files = image_files(path)
    verify_images(files)
    return files


def _image_shape(path: Path) -> tuple[int, ...]:
    return tuple(next(iter_image_batches([path])).shape[1:])


def reference_stats(files: list[Path], detector: Detector, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(μ, Σ, n) of the detector's features over image files, through the same feature sums as the FID."""
    metric = make_metric(detector)
    with torch.no_grad():
        for images in iter_image_batches(files, batch_size, "images"):
            metric.update(images, real=True)
    return metric_stats(metric, real=True)
