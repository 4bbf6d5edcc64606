"""train.py as a user meets it: one-line errors, no optimizer section, a quiet terminal, readable TensorBoard."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dode_lightning.cli import train_main
from dode_lightning.figures import stage_kinds
from dode_lightning.quiet import silence_lightning_noise
from dode_lightning.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(tmp_path: Path, logger: str = "false") -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"trainer: {{logger: {logger}}}\n"
        "model: {denoiser: {source: gmm_digits}, solver: heun, nfe: 5}\n"
        "data: {scale: 2, batch_size: 4, class_conditional: false, cache_dir: null}\n"
    )
    return config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args", [["--optimizer", "SGD"], ["--lr_scheduler", "StepLR"]])
def test_optimizer_and_scheduler_sections_are_refused(tmp_path, capsys, monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train_main(["--config", str(_tiny_config(tmp_path)), *args]) == 2
    assert "no optimizer or lr_scheduler section" in _one_error_line(capsys)


def test_optimizer_in_the_config_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = _tiny_config(tmp_path)
    config.write_text(config.read_text() + "optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}\n")
    assert train_main(["--config", str(config)]) == 2
    assert "no optimizer or lr_scheduler section" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train_main(["--config", str(_tiny_config(tmp_path)), "--trainer.accelerator", "gpu"]) == 2
    assert "--trainer.accelerator cpu" in _one_error_line(capsys)


def test_help_documents_every_option_and_lists_choices(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.nfe NFE network evaluations of the student" in text
    assert "--data.batch_size BATCH_SIZE |B|, calibration samples" in text
    assert "--data.cache_dir CACHE_DIR where teacher targets are cached" in text
    assert "--model.solver SOLVER student solver. Choices: ddim," in text
    assert "--model.fit {closed_form,adam,compare,joint}" in text and "--data.target_mode {aligned,paper}" in text
    assert "Choices: karras, time_uniform" in text and "--exact_report" in text
    assert "--optimizer" not in text and "--lr_scheduler" not in text


def test_no_logger_writes_only_the_lambda_file_and_the_report_can_be_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    output = tmp_path / "l.safetensors"
    assert train_main(["--config", str(_tiny_config(tmp_path)), "--model.output", str(output), "--exact_report", "false"]) == 0
    assert output.is_file() and list(work.iterdir()) == []  # no config.yaml, no lightning_logs in the working directory
    out = capsys.readouterr().out
    assert "| stage |" in out and "RMSE to the exact" not in out and "exact-model report" not in out


def test_quiet_filters_drop_exactly_the_listed_noise():
    silence_lightning_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_lightning_noise()  # catch_warnings restored the filters; install them inside the block again
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", DeprecationWarning)
        warnings.warn("Found 1 module(s) in eval mode at the start of training. This may lead to unexpected behavior")
        warnings.warn("The dataloader does not have many workers")
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers"]
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    records = [logging.LogRecord(logger.name, logging.INFO, __file__, 1, text, None, None) for text in (
        "GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]", "Validation is off",
    )]
    assert [r.getMessage() for r in records if logger.filter(r)] == ["Validation is off"]
    seed = logging.getLogger("lightning_fabric.utilities.seed")
    for text in ("Seed set to 0", "[rank: 1] Seed set to 0"):
        assert not seed.filter(logging.LogRecord(seed.name, logging.INFO, __file__, 1, text, None, None)), text


def test_heun_stages_alternate_predictor_and_corrector():
    heun = make_solver("heun", nfe=5)
    assert stage_kinds(float(heun.sigmas[0]), heun.target_sigmas) == ["predictor", "corrector", "predictor", "corrector", "predictor"]


def _run_train(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, logger: {class_path: pytorch_lightning.loggers.TensorBoardLogger, init_args: {save_dir: "
        + json.dumps(str(tmp_path / "runs")) + ", name: tiny}}}\n"
        "model: {denoiser: {source: gmm_digits}, solver: heun, nfe: 5, fit: adam, adam_steps: 3}\n"
        "data: {scale: 2, batch_size: 8, class_conditional: false, cache_dir: null}\n"
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--exact_report", "false", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def test_terminal_is_quiet_and_tensorboard_runs_are_named_and_summarised(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _run_train(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    terminal = first.stdout + first.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "in eval mode", "Epoch 0", "Training", "Seed set"):
        assert noise not in terminal, noise
    assert "fit (adam)" in first.stderr  # one bar over the fit steps instead
    second = _run_train(tmp_path, "--data.target_mode", "paper")
    third = _run_train(tmp_path)
    assert second.returncode == 0 and third.returncode == 0, (second.stderr[-2000:], third.stderr[-2000:])
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert runs == ["heun_nfe5_aligned_adam", "heun_nfe5_aligned_adam_2", "heun_nfe5_paper_adam"]
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "heun_nfe5_paper_adam"), size_guidance={"tensors": 0})
    events.Reload()
    (summary,) = events.Tensors("summary/stages/text_summary")
    text = summary.tensor_proto.string_val[0].decode()
    assert text.startswith("heun, NFE 5, fit adam, targets paper, C = 2, |B| = 8, teacher euler") and "| stage |" in text
    assert {"_hparams_/session_start_info", "_hparams_/experiment"} <= set(events.PluginTagToContent("hparams"))
    assert {"summary/loss_base", "summary/loss_d"} <= set(events.Tags()["scalars"])
