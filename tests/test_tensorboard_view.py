"""TensorBoard's first view of a calibration run: λ per stage as one chart, RMSE metrics with the headline ratio, the
key hyperparameters shown by default in HParams, no `epoch` scalar; and a console hint that works without a venv."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from dode_lightning.cli import KEY_HPARAMS, train_main


def _train(tmp_path: Path, fit: str) -> tuple[str, object]:
    """An in-process train.py run on the built-in model (Euler NFE 4, C = 2, |B| = 8): console output and events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": fit}}
    config = tmp_path / f"{fit}.yaml"
    config.write_text(
        f"trainer: {{logger: {json.dumps(logger)}}}\n"
        f"model: {{denoiser: {{source: gmm_digits}}, solver: euler, nfe: 4, fit: {fit}, adam_steps: 3}}\n"
        "data: {scale: 2, batch_size: 8, class_conditional: false, cache_dir: null}\n"
    )
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(tmp_path)
        assert train_main(["--config", str(config)] + ([] if fit == "closed_form" else ["--exact_report", "false"])) == 0
    (run,) = (tmp_path / "runs" / fit).iterdir()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return out.getvalue(), events


@pytest.fixture(scope="module")
def closed_form(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tb"), "closed_form")


def test_lambda_per_stage_is_one_chart_and_there_is_no_epoch_scalar(closed_form):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, events = closed_form
    scalars = events.Tags()["scalars"]
    assert "epoch" not in scalars and not any(re.fullmatch(r"(lambda|loss)/stage_\d+", tag) for tag in scalars)
    assert sorted({tag.split("/")[0] for tag in scalars})[:2] == ["lambda", "loss"]  # the first groups on Time Series
    per_stage = events.Scalars("lambda/per_stage")
    assert [point.step for point in per_stage] == [1, 2, 3]  # Euler NFE 4: stage 0 has no λ
    assert len(events.Scalars("loss/per_stage_base")) == len(events.Scalars("loss/per_stage_d")) == 3
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {"λ_k": [r"^lambda/per_stage$"], "loss_k, base and D": [r"^loss/per_stage_(base|d)$"]}


def test_hparams_show_the_key_settings_first_and_the_headline_ratio(closed_form):
    from tensorboard.plugins.hparams import plugin_data_pb2

    console, events = closed_form
    content = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    info = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    # HParams sorts by (differs first, name) and displays the first five columns: the key ones are marked.
    assert sorted(h.name for h in info.hparam_infos if h.differs) == sorted(KEY_HPARAMS)
    metrics = [m.name.tag for m in info.metric_infos]
    assert metrics[:4] == ["rmse_exact/held_out_d_over_base", "rmse_exact/held_out_base", "rmse_exact/held_out_d", "rmse_exact/held_out_teacher"]
    assert {"rmse_teacher/base", "rmse_teacher/d", "summary/loss_base", "summary/loss_d"} <= set(metrics)
    # The headline is the console's held-out ratio.
    row = next(line for line in console.splitlines() if line.startswith("| held-out"))
    base, d_ode = (float(cell.split()[0]) for cell in row.split("|")[2:4])
    (ratio,) = events.Scalars("rmse_exact/held_out_d_over_base")
    assert ratio.value == pytest.approx(d_ode / base, rel=1e-3)


def test_adam_steps_are_logged_without_epoch(tmp_path):
    _, events = _train(tmp_path, "adam")
    scalars = events.Tags()["scalars"]
    assert "epoch" not in scalars and [p.step for p in events.Scalars("lambda/stage_01")] == [1, 2, 3]
    assert "rmse_teacher/d_over_base" in scalars


def test_tensorboard_hint_works_without_an_activated_venv(closed_form):
    console, _ = closed_form
    command = next(line for line in console.splitlines() if line.startswith("TensorBoard: ")).removeprefix("TensorBoard: ")
    done = subprocess.run([*shlex.split(command), "--version_tb"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and re.match(r"\d+\.\d+", done.stdout.strip()), done.stderr[-500:]
