"""Command-line entry of calibration (`train.py`): LightningCLI without subcommands, a report, the λ file."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.cli import LightningCLI

from .checkpoints import CheckpointError
from .distill import StageFit, rmse, seeded_noise
from .lambda_file import save_lambdas
from .lightning import ConfigError, DODECalibration, TeacherTargets, limit_threads_for_builtin

__all__ = ["train_main", "HELD_OUT_SEED"]

# Held-out seeds for the exact-model report start far from any calibration batch.
HELD_OUT_SEED = 1_000_000
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "enable_checkpointing": False,
    "enable_model_summary": False,
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


def _output_path(module: DODECalibration, trainer: Any) -> Path:
    if module.hparams.output:
        return Path(module.hparams.output)
    log_dir = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
    return Path(log_dir) / "lambdas.safetensors"


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write the λ file to {path.parent} ({err.strerror}); choose another --model.output") from None


def _stage_table(module: DODECalibration, fit: StageFit) -> str:
    lines = ["| stage | σ (eval) | σ (state) | b | λ | loss base → D |", "|---|---|---|---|---|---|"]
    for k in range(module.student.num_stages):
        lam = f"{float(fit.lambdas[k]):+.4f}" if module.student.lambda_fitted[k] else "0 (fixed)"
        lines.append(
            f"| {k:2d} | {float(fit.sigmas[k]):.4g} | {float(module.student.target_sigmas[k]):.4g} | {float(fit.coeffs[k]):.4g} "
            f"| {lam} | {float(fit.loss_base[k]):.3e} → {float(fit.loss_fit[k]):.3e} |"
        )
    return "\n".join(lines)


def _comparison_table(comparison: dict[str, Any], module: DODECalibration) -> str:
    closed, adam = comparison["closed_form"], comparison["adam"]
    lines = ["| stage | λ closed form | λ Adam | loss closed form | loss Adam |", "|---|---|---|---|---|"]
    for k, free in enumerate(module.student.lambda_fitted):
        if free:
            lines.append(
                f"| {k:2d} | {float(closed.lambdas[k]):+.5f} | {float(adam.lambdas[k]):+.5f} "
                f"| {float(closed.loss_fit[k]):.5e} | {float(adam.loss_fit[k]):.5e} |"
            )
    total_c, total_a = float(closed.loss_fit.sum()), float(adam.loss_fit.sum())
    lines.append(
        f"\nobjective: closed form {total_c:.6e} (1 pass, {comparison['closed_form_seconds']:.3f} s); "
        f"Adam {total_a:.6e} ({comparison['adam_iterations']} iterations, {comparison['adam_seconds']:.3f} s); "
        f"Adam / closed form = {total_a / total_c:.4f}"
    )
    return "\n".join(lines)


def exact_report(module: DODECalibration, data: TeacherTargets, held_out: int = 200) -> str:
    """RMSE to the exact ODE endpoint of base student, D-student and teacher (built-in exact model only)."""
    from .distill import build_teacher

    mixture, student = module.denoiser, module.student
    teacher, _ = build_teacher(student, module.setup_spec, data.scale, data.target_mode, data.teacher_name)
    label_dim = module.loaded.label_dim if data._conditional(module) else 0
    rows = []
    for name, seeds in (("calibration", data.seeds), ("held-out", range(HELD_OUT_SEED, HELD_OUT_SEED + held_out))):
        noise, labels = seeded_noise(seeds, module.loaded.image_shape, label_dim)
        start = student.init_state(noise) / float(student.scales[0])
        exact = mixture.exact_endpoint(start, float(student.sigmas[0]), labels)
        lambdas = module.lambdas.detach().cpu()
        base = rmse(student.sample(mixture, noise, class_labels=labels), exact)
        d_ode = rmse(student.sample(mixture, noise, lambdas, labels), exact)
        teach = rmse(teacher.sample(mixture, noise, class_labels=labels), exact)
        rows.append(f"| {name} ({len(noise)}) | {base:.5f} | {d_ode:.5f} ({d_ode / base:.2f}×) | {teach:.5f} |")
    header = "| seeds | base student | D-student | teacher |\n|---|---|---|---|"
    return "RMSE to the exact probability-flow ODE endpoint:\n" + header + "\n" + "\n".join(rows)


def train_main(args: list[str] | None = None) -> int:
    """`python train.py --config configs/x.yaml [--model.nfe 5 …]`; returns the exit code."""
    started = time.perf_counter()
    try:
        cli = LightningCLI(
            DODECalibration,
            TeacherTargets,
            run=False,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
        module, data, trainer = cli.model, cli.datamodule, cli.trainer
        limit_threads_for_builtin(module.loaded, trainer.strategy.root_device)
        output = _output_path(module, trainer)
        _check_writable(output)
        trainer.fit(module, datamodule=data)
    except (ConfigError, CheckpointError, FileNotFoundError, ImportError) as err:
        return _fail(str(err))
    fit = module.evaluate()  # a collective under DDP: every rank takes part
    if trainer.global_rank != 0:
        return 0
    metadata = {**module.metadata(), **data.metadata(module), "fit": module.fit_method}
    tensors = {
        "lambdas": module.lambdas.detach().cpu(),
        "coeffs": fit.coeffs,
        "sigmas": fit.sigmas,
        "target_sigmas": module.student.target_sigmas,
        "lambda_fitted": torch.tensor(module.student.lambda_fitted),
    }
    save_lambdas(output, tensors, metadata)
    fit_seconds = module.timings.get("closed_form", 0.0) + module.timings.get("adam", 0.0)
    print(f"\n{module.setup_spec.name}, NFE {module.student.nfe}, fit {module.fit_method}, targets {data.target_mode}, C = {data.scale}, |B| = {data.batch_size}")
    print(_stage_table(module, fit))
    if module.comparison:
        print("\nclosed form vs Adam:\n" + _comparison_table(module.comparison, module))
    calibrated = time.perf_counter() - started
    if module.loaded.source == "gmm_digits":
        print("\n" + exact_report(module, data))
    teacher = "cache hit" if data.cache_hit else f"{data.teacher_seconds:.2f} s"
    other = calibrated - data.teacher_seconds - fit_seconds
    print(
        f"\ntime: teacher {teacher} (NFE {data.teacher_nfe}), fit {fit_seconds:.2f} s, other {other:.2f} s "
        f"(set-up, Lightning, logging), calibration total {calibrated:.2f} s; exact-model report "
        f"{time.perf_counter() - started - calibrated:.2f} s"
    )
    print(f"λ file: {output}")
    if trainer.logger is not None:
        print(f"TensorBoard: tensorboard --logdir {trainer.logger.save_dir}")
    return 0
