"""Command-line entry of calibration (`train.py`): LightningCLI without subcommands, a report, the λ file."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml
from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from tqdm.auto import tqdm

from .atomic import writable_folder_error
from .checkpoints import CheckpointError, config_relative
from .cli_common import Interrupted, forget_run_version, one_line, run_until_stopped, signals_deferred, tensorboard_command, unique_version
from .denoisers import ve_form
from .distill import StageFit, rmse, seeded_noise
from .grids import GRIDS, LEARNED_GRIDS
from .lambda_file import LambdaFileError, check_lambdas, save_lambdas
from .lightning import ConfigError, DODECalibration, TeacherTargets, lambda_file_contents, limit_threads_for_builtin, own_direction
from .quiet import silence_lightning_noise
from .solvers import SOLVERS

__all__ = ["train_main", "HELD_OUT_SEED", "CheckedTrainerCLI", "CalibrationCLI", "parse_error", "run_version"]

# Held-out seeds for the exact-model report start far from any calibration batch.
HELD_OUT_SEED = 1_000_000
# Hyperparameters HParams shows first: it displays only the first five columns until others are ticked.
KEY_HPARAMS = ("solver", "nfe", "teacher", "target_mode", "fit")
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    # Lightning's "Epoch 0/-2" bar means nothing for a one-batch fit; DODECalibration shows one bar over fit steps.
    "enable_progress_bar": False,
    "num_sanity_val_steps": 0,
    # TeacherTargets shards the calibration seeds across ranks itself; a DistributedSampler would split them again.
    "use_distributed_sampler": False,
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "calibration", "default_hp_metric": False},
    },
}


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_error(err: argparse.ArgumentError, program: str) -> str:
    """The one-line message of a jsonargparse/argparse error, with what to do about it."""
    text = one_line(str(err))
    if "optimizer" in text or "lr_scheduler" in text:
        return f"{text}: λ are fitted by --model.fit (closed_form, adam, compare or joint; Adam settings --model.adam_lr, --model.adam_steps; joint settings --model.joint_*), there is no optimizer or lr_scheduler section"
    return f"{text}; see python {program} --help"


def run_version(model: Namespace, data: Namespace, root: Path) -> str:
    """`<solver>_nfe<N>_<target mode>_<fit>[_teacher-<name>]`, with `_2`, `_3`, … when `root` already holds it."""
    base = f"{model.solver}_nfe{model.nfe}_{data.target_mode}_{model.fit}"
    if data.teacher:
        base += f"_teacher-{data.teacher}"
    return unique_version(root, base)


def _add_choices(parser: LightningArgumentParser, choices: dict[str, Sequence[str]]) -> None:
    for action in parser._actions:
        if action.dest in choices and action.help:
            action.help = f"{action.help.rstrip()} Choices: {', '.join(choices[action.dest])}."


class SaveConfigToLogDir(SaveConfigCallback):
    """config.yaml goes into the run's log folder; without a logger there is none, and nothing is written."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class CheckedTrainerCLI(LightningCLI):
    """LightningCLI whose Trainer-argument errors (an accelerator this machine lacks, `devices abc`, …) are a
    ConfigError: one line for the user instead of a traceback."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as err:
            raise ConfigError(
                f"cannot set up the Trainer: {one_line(str(err))}; check the trainer section "
                "(e.g. --trainer.accelerator cpu on a machine without a GPU)"
            ) from None


class CalibrationCLI(CheckedTrainerCLI):
    """train.py's LightningCLI: no optimizer or lr-scheduler sections (λ have their own fit), choices in --help, an
    `--exact_report` switch, and TensorBoard runs named by configuration instead of `version_N`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--exact_report",
            type=bool,
            default=True,
            help="built-in model only: RMSE of base student, D-student and teacher to the exact ODE endpoint on the "
            "calibration and 200 held-out seeds (several seconds; false skips it)",
        )
        names = sorted(SOLVERS)
        _add_choices(parser, {"model.solver": names, "data.teacher": names, "model.grid": GRIDS + LEARNED_GRIDS})

    def before_instantiate_classes(self) -> None:
        self._config_relative_denoiser()
        logger = self.config.trainer.logger
        if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            return
        init = logger.init_args
        if init.get("version") is None:
            init.version = run_version(self.config.model, self.config.data, Path(init.save_dir) / (init.get("name") or ""))


    def _config_relative_denoiser(self) -> None:
        """Denoiser files named in a config file are relative to that file (a command-line value stays relative to
        the working directory): each option still equal to the last config file's value is resolved against it."""
        denoiser = self.config.model.get("denoiser")
        for config_file in reversed([Path(str(path)) for path in self.config.get("config") or []]):
            try:
                section = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("denoiser")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(section, dict) and isinstance(denoiser, dict):
                resolved = config_relative(section, config_file.parent)
                self.config.model.denoiser = {key: resolved[key] if section.get(key) == value else value for key, value in denoiser.items()}
                return


def _output_path(module: DODECalibration, trainer: Any) -> Path:
    if module.hparams.output:
        return Path(module.hparams.output)
    log_dir = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
    return Path(log_dir) / "lambdas.safetensors"


def _check_writable(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise ConfigError(f"--model.output {path} is not a file; name the λ file itself, e.g. {path / 'lambdas.safetensors'}")
    reason = writable_folder_error(path.parent)
    if reason is not None:
        raise ConfigError(f"cannot write the λ file to {path.parent} ({reason}); choose another --model.output")


def _stage_table(module: DODECalibration, fit: StageFit) -> str:
    lines = ["| stage | σ (eval) | σ (state) | b | λ | loss base → D |", "|---|---|---|---|---|---|"]
    for k in range(module.student.num_stages):
        lam = _lambda_cell(fit, k, module.metadata_lambdas()["dropped_stages"]) if module.student.lambda_fitted[k] else "0 (fixed)"
        lines.append(
            f"| {k:2d} | {float(fit.sigmas[k]):.4g} | {float(module.student.target_sigmas[k]):.4g} | {float(fit.coeffs[k]):.4g} "
            f"| {lam} | {float(fit.loss_base[k]):.3e} → {float(fit.loss_fit[k]):.3e} |"
        )
    return "\n".join(lines)


def _lambda_cell(fit: StageFit, k: int, dropped: list[int]) -> str:
    """λ_k, or with several λ per stage the paper's one (own direction, mean over groups) and how many more."""
    if k in dropped:
        return "0 (guard)"
    own = f"{float(own_direction(fit.lambdas)[k]):+.4f}"
    return own if fit.layout.scalar else f"{own} (+{fit.lambdas[k].numel() - 1} more)"


def _comparison_table(comparison: dict[str, Any], module: DODECalibration) -> str:
    closed, adam = comparison["closed_form"], comparison["adam"]
    lines = ["| stage | λ closed form | λ Adam | loss closed form | loss Adam |", "|---|---|---|---|---|"]
    for k, free in enumerate(module.student.lambda_fitted):
        if free:
            lines.append(
                f"| {k:2d} | {float(own_direction(closed.lambdas)[k]):+.5f} | {float(own_direction(adam.lambdas)[k]):+.5f} "
                f"| {float(closed.loss_fit[k]):.5e} | {float(adam.loss_fit[k]):.5e} |"
            )
    total_c, total_a = float(closed.loss_fit.sum()), float(adam.loss_fit.sum())
    lines.append(
        f"\nobjective: closed form {total_c:.6e} (1 pass, {comparison['closed_form_seconds']:.3f} s); "
        f"Adam {total_a:.6e} ({comparison['adam_iterations']} iterations, {comparison['adam_seconds']:.3f} s); "
        f"Adam / closed form = {total_a / total_c:.4f}"
    )
    return "\n".join(lines)


def joint_summary(module: DODECalibration) -> str:
    """The joint fit in two lines: final-state loss before/after (training and held-out rows), cost, fitted σ."""
    result = module.joint_result
    held = "" if result.held_start is None else f", held-out {result.held_start:.4e} → {result.held_end:.4e}"
    kept = "the start (no iterate beat it)" if result.best_iteration == 0 else f"iteration {result.best_iteration}"
    sigmas = ", ".join(f"{float(s):.4g}" for s in result.sigmas)
    hard = module.trainer.datamodule.hard
    mined = "" if hard is None else (
        f"hard seeds: {len(hard['seeds'])} of {hard['pool']} screened seeds ({hard['screen_evaluations']} forward evaluations; "
        f"teacher on those outside the batch {hard['teacher_evaluations']}), row weights hard {hard['weights'][0]:.3g}, others {hard['weights'][1]:.3g}\n"
    )
    return mined + (
        f"joint fit: {'final-state MSE' if not module.hparams.joint_intermediate else 'loss (final state + weighted per-stage MSE)'} {result.loss_start:.4e} → {result.loss_end:.4e}{held}; kept {kept} of {result.iterations}; "
        f"{result.forward_rows * module.network_nfe()} forward + {result.backward_rows * module.network_nfe()} backward network evaluations "
        f"({result.forward_runs} + {result.backward_runs} student runs on its rows)\nfitted σ: {sigmas}"
    )


def misaligned_warning(fit: StageFit, data: TeacherTargets) -> str:
    """The loud warning for stage-0 targets at the wrong teacher states (see StageFit.misaligned)."""
    ratio = float(fit.loss_base[0] / fit.loss_step[0])
    return (
        f"WARNING: stage 0 starts where the teacher starts, yet its loss {float(fit.loss_base[0]):.3e} is "
        f"{ratio:.2f}× the step's own size (correct targets: ≤ 0.05×): the teacher targets look misaligned "
        f"(teacher {data.teacher_name or 'default'}, targets {data.target_mode}); the λ file may make the solver worse"
    )


def exact_report(module: DODECalibration, data: TeacherTargets, held_out: int = 200) -> tuple[str, dict[str, float]]:
    """RMSE to the exact ODE endpoint of base student, D-student and teacher (built-in exact model only): the
    console's table, and the held-out figures as TensorBoard metrics (the D / base ratio first, the headline)."""
    mixture, student = module.denoiser, module.student
    teacher, _ = data.teacher(module)
    label_dim = module.loaded.label_dim if data._conditional(module) else 0
    lambdas = module.applied_lambdas().cpu()
    rows = []
    shape = module.loaded.image_shape
    held_out_seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + held_out)
    batches = {"calibration": data.calibration_noise(shape, label_dim), "held-out": seeded_noise(held_out_seeds, shape, label_dim)}
    with tqdm(total=8, desc="exact-model report") as bar:
        for name, (noise, labels) in batches.items():
            start = ve_form(student.init_state(noise), student.sigmas[0], student.scales[0])
            exact = mixture.exact_endpoint(start, float(student.sigmas[0]), labels, sigma_end=float(student.sigmas[-1]))
            bar.update(1)
            errors = []
            for lam, solver in ((None, student), (lambdas, student), (None, teacher)):
                errors.append(rmse(solver.sample(module.student_denoiser if solver is student else mixture, noise, lam, labels), exact))
                bar.update(1)
            base, d_ode, teach = errors
            rows.append(f"| {name} ({len(noise)}) | {base:.5f} | {d_ode:.5f} ({d_ode / base:.2f}×) | {teach:.5f} |")
    header = "| seeds | base student | D-student | teacher |\n|---|---|---|---|"
    metrics = {"rmse_exact/held_out_d_over_base": d_ode / base, "rmse_exact/held_out_base": base, "rmse_exact/held_out_d": d_ode, "rmse_exact/held_out_teacher": teach}
    return "RMSE to the exact probability-flow ODE endpoint:\n" + header + "\n" + "\n".join(rows), metrics


def summary_metrics(module: DODECalibration, fit: StageFit, exact: dict[str, float]) -> dict[str, float]:
    """The run's figures for HParams, headline first (it shows the first five metric columns): the held-out exact
    RMSE (built-in model), the RMSE of the finished students to the teacher's endpoint, and the total losses."""
    metrics = dict(exact)
    if module.teacher_rmse:
        base, d_ode = module.teacher_rmse["base"], module.teacher_rmse["d"]
        if not exact:
            metrics["rmse_teacher/d_over_base"] = d_ode / base if base > 0 else float("nan")
        metrics.update({"rmse_teacher/base": base, "rmse_teacher/d": d_ode})
    metrics.update({"summary/loss_base": float(fit.loss_base.sum()), "summary/loss_d": float(fit.loss_fit.sum())})
    return metrics


def log_summary(logger: Any, table: str, hparams: dict[str, Any], fit: StageFit, module: DODECalibration, metrics: dict[str, float]) -> None:
    """TensorBoard's first screen of a run: λ and loss per stage as one chart each (x = stage k, also as custom
    scalars), the console's per-stage table as text, HParams with the key hyperparameters first, and the metrics.
    Tag groups sort alphabetically on the Time Series page: lambda, loss, then rmse_* and summary (single points)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return
    writer = logger.experiment
    lambdas = own_direction(fit.lambdas)
    for k, free in enumerate(module.student.lambda_fitted):
        if free:
            writer.add_scalar("lambda/per_stage", float(lambdas[k]), k)
            writer.add_scalar("loss/per_stage_base", float(fit.loss_base[k]), k)
            writer.add_scalar("loss/per_stage_d", float(fit.loss_fit[k]), k)
    layout = {"D-ODE: per stage (x = stage k)": {"λ_k": ["Multiline", [r"^lambda/per_stage$"]], "loss_k, base and D": ["Multiline", [r"^loss/per_stage_(base|d)$"]]}}
    if module.fit_method == "joint":
        layout["Joint fit (x = iteration)"] = {
            "σ_k": ["Multiline", [r"^sigma/\d+$"]], "λ of every stage": ["Multiline", [r"^lambda/stage_\d+$"]], "final-state MSE": ["Multiline", [r"^loss/final_state$"]],
        }
    elif module.fit_method != "closed_form":
        layout["Adam fit (x = step)"] = {"λ of every stage": ["Multiline", [r"^lambda/stage_\d+$"]], "loss of every stage": ["Multiline", [r"^loss/stage_\d+$"]]}
    writer.add_custom_scalars(layout)
    writer.add_text("summary/stages", table, global_step=0)
    logger.log_hyperparams(hparams)  # hparams.yaml; the HParams summaries follow
    logger.log_metrics(metrics, step=0)
    for summary in hparams_summaries(hparams, metrics):
        writer._get_file_writer().add_summary(summary, 0)
    logger.save()


def hparams_summaries(hparams: dict[str, Any], metrics: dict[str, float]) -> list[Any]:
    """The HParams plugin's experiment, session-start and session-end summaries, the key hyperparameters marked.

    TensorBoard sorts the columns by (`differs` first, name) and displays the first five until others are ticked;
    marking KEY_HPARAMS as `differs` makes them those five. Metrics keep their order (headline first)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as hparams_protos

    experiment, start, end = hparams_protos(hparams, metrics)
    metadata = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(metadata.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in KEY_HPARAMS
    metadata.content = data.SerializeToString()
    return [experiment, start, end]


def train_main(args: list[str] | None = None) -> int:
    """`python train.py --config configs/x.yaml [--model.nfe 5 …]`; returns the exit code.

    SIGINT and SIGTERM stop the run wherever it is, with one line and exit code 130 / 143. The λ file is written
    atomically once the fit is done, so a run stopped earlier writes none and leaves an existing file at the output
    path as it was (the line says that it is an earlier run's); a run that did not finish removes its TensorBoard run
    folder, so the rerun takes the same name.
    """
    forget_run_version()
    progress: dict[str, Any] = {}
    return run_until_stopped(lambda: _calibrate(args, progress), lambda stop: _stopped(stop, progress), lambda code: bool(progress.get("saved")))


def _stopped(stop: Interrupted, progress: dict[str, Any]) -> str:
    output: Path | None = progress.get("output")
    if progress.get("saved"):
        return f"stopped by {stop.name} after the λ file was written: {output} is complete (the report was cut short)"
    earlier = f" ({output} there now is an earlier run's)" if output is not None and output.exists() else ""
    data: TeacherTargets | None = progress.get("data")
    cached = " (the teacher targets are cached: it skips the teacher)" if data is not None and data.data is not None and data.cache_dir is not None else ""
    return f"stopped by {stop.name}; no λ file written{earlier}; rerun the same command to calibrate{cached}"


def _calibrate(args: list[str] | None, progress: dict[str, Any]) -> int:
    """train.py's run; records the datamodule (`data`), the λ file's path (`output`) and whether it is written
    (`saved`) in `progress`."""
    started = time.perf_counter()
    silence_lightning_noise()
    try:
        with warnings.catch_warnings():
            # `args` replaces the command line on purpose (tests, scripts): Lightning warns when sys.argv holds others.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = CalibrationCLI(
                DODECalibration,
                TeacherTargets,
                run=False,
                args=args,
                trainer_defaults=TRAINER_DEFAULTS,
                save_config_callback=SaveConfigToLogDir,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
        module, data, trainer = cli.model, cli.datamodule, cli.trainer
        progress["data"] = data
        # Under DDP a rank that dies leaves the others in a collective: they stop in one line naming it.
        from .sampling import RankWatchdog

        trainer.callbacks.append(RankWatchdog(advice="no λ file written: rerun the same command to calibrate"))
        limit_threads_for_builtin(module.loaded, trainer.strategy.root_device)
        output = progress["output"] = _output_path(module, trainer)
        _check_writable(output)
        trainer.fit(module, datamodule=data)
    except argparse.ArgumentError as err:
        return _fail(parse_error(err, "train.py"))
    except (ConfigError, CheckpointError, FileNotFoundError, ImportError) as err:
        return _fail(str(err))
    fit = module.evaluate()  # a collective under DDP: every rank takes part
    if trainer.global_rank != 0:
        return 0
    try:
        check_lambdas(module.lambdas.detach().cpu(), "the fit", f"no λ file written: the denoiser or the teacher targets are not finite (cache_dir {data.cache_dir})")
    except LambdaFileError as err:
        return _fail(str(err))
    tensors, metadata = lambda_file_contents(module, data, fit)
    with signals_deferred():
        save_lambdas(output, tensors, metadata)
        progress["saved"] = True
    fit_seconds = sum(module.timings.get(key, 0.0) for key in ("closed_form", "adam", "joint"))
    if module.placement:
        targets = f"steps and targets from the {metadata['teacher']} trajectory (teacher_dp, M = {module.hparams.dp_steps}, c = {module.hparams.dp_coefficient:g})"
    else:
        targets = f"targets {data.target_mode}, C = {data.scale}"
    first = "" if module.network_nfe() == module.student.nfe else " (+ the stored first step)"
    heading = f"{module.setup_spec.name}, NFE {module.network_nfe()}{first}, fit {module.fit_method}, {targets}, |B| = {data.batch_size}"
    table = _stage_table(module, fit)
    print(f"\n{heading}\n{table}")
    if fit.misaligned():
        print(misaligned_warning(fit, data), file=sys.stderr)
    if module.comparison:
        print("\nclosed form vs Adam:\n" + _comparison_table(module.comparison, module))
    if module.joint is not None:
        print("\n" + joint_summary(module))
    calibrated = time.perf_counter() - started
    report = module.loaded.source in ("gmm_digits", "gmm_digits_flow") and cli.config.exact_report
    exact: dict[str, float] = {}
    if report:
        text, exact = exact_report(module, data)
        print("\n" + text)
    hparams = {key: value for key, value in metadata.items() if isinstance(value, (str, int, float, bool))}
    log_summary(trainer.logger, f"{heading}, teacher {metadata['teacher']}\n\n{table}", hparams, fit, module, summary_metrics(module, fit, exact))
    teacher = "cache hit" if data.cache_hit else f"{data.teacher_seconds:.2f} s"
    other = calibrated - data.teacher_seconds - fit_seconds
    report_time = f"; exact-model report {time.perf_counter() - started - calibrated:.2f} s" if report else ""
    print(
        f"\ntime: teacher {teacher} (NFE {data.teacher_nfe}), fit {fit_seconds:.2f} s, other {other:.2f} s "
        f"(set-up, Lightning, logging), calibration total {calibrated:.2f} s{report_time}"
    )
    # Student runs: the fit (closed form: one pass; Adam: one per iteration, compare: both; joint: its closed-form
    # start, its own runs and backward passes are in the joint summary) and the final statistics.
    student_runs = {"adam": module.adam_iterations, "compare": module.adam_iterations + 1}.get(module.fit_method, 1) + 1
    teacher_rows = 0 if data.cache_hit else data.teacher_nfe * data.batch_size
    placement = f"placement teacher on the dp_seeds after the batch {data.placement_evaluations}, " if data.placement_evaluations else ""
    print(
        f"network evaluations ({'forward; the joint fit above' if module.joint is not None else 'forward, no backward'}): teacher {teacher_rows} ({data.teacher_nfe} × {data.batch_size} rows"
        f"{', cached' if data.cache_hit else ''}), {placement}student {student_runs * module.network_nfe() * data.batch_size} "
        f"({student_runs} runs × NFE {module.network_nfe()} × {data.batch_size} rows)"
    )
    print(f"λ file: {output}")
    if trainer.logger is not None:
        print(f"TensorBoard: {tensorboard_command(trainer.logger.save_dir)}")
    return 0
