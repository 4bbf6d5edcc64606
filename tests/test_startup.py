"""Start-up: the commands that do not sample import neither Lightning nor torchmetrics (benchmarks/startup.py times
them); `--lambdas` takes a run folder holding one λ file."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.startup import png_folders
from dode_lightning.lambda_file import save_lambdas
from dode_lightning.sample_cli import CALIBRATION_ONLY_KEYS, SAMPLER_KEYS, sample_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_digits.yaml"
HEAVY = ("pytorch_lightning", "torchmetrics")
# Runs sample.py's entry in a fresh interpreter, then prints which heavy packages it imported.
_PROBE = (
    "import sys\nfrom dode_lightning.sample_cli import sample_main\ncode = 0\n"
    "try:\n    code = sample_main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
    f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], code)"
)


def test_written_out_model_keys_match_the_signatures():
    from dode_lightning.lightning import DODECalibration
    from dode_lightning.sampling import DODESampler

    sampler = [p for p in inspect.signature(DODESampler.__init__).parameters if p not in ("self", "lambdas", "class_conditional", "eval_batch")]
    calibration = [p for p in inspect.signature(DODECalibration.__init__).parameters if p not in ("self", *sampler)]
    assert list(SAMPLER_KEYS) == sampler and list(CALIBRATION_ONLY_KEYS) == calibration


def _lambda_file(folder: Path) -> Path:
    from dode_lightning.lightning import build_student

    built = build_student({"source": "gmm_digits"}, "euler", 4)
    return save_lambdas(folder / "lambdas.safetensors", {"lambdas": torch.zeros(built.solver.num_stages, dtype=torch.float64), "sigmas": built.solver.sigmas}, built.metadata())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("startup")
    png_folders(folder, 8)
    run = folder / "run"
    run.mkdir()
    lambdas = _lambda_file(run)
    return {"dir": str(folder), "run": str(run), "lambdas": str(lambdas)}


def test_light_commands_import_neither_lightning_nor_torchmetrics(files):
    d = files["dir"]
    sample = ["--config", str(CONFIG), "--seeds", "0-3", "--outdir", f"{d}/out"]
    commands = [
        ["--help"],
        [*sample, "--lambdas", "none", "--print_config"],
        [*sample, "--lambdas", files["lambdas"], "--print_config"],
        ["fid-ref", "--images", f"{d}/real", "--out", f"{d}/ref.npz"],
        ["fid", "--images", f"{d}/fake", "--fid-ref", f"{d}/ref.npz"],
        ["export-scheduler", "--help"],
        ["export-scheduler", "--lambdas", files["lambdas"], "--pipeline", d, "--out", f"{d}/scheduler"],  # refused: not a VP model
    ]
    codes = []
    for argv in commands:
        done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=d, env={**os.environ, "PYTHONPATH": str(ROOT)})
        last = done.stdout.strip().splitlines()[-1]
        assert last.startswith("HEAVY [] "), (argv, last, done.stderr[-1000:])
        codes.append(last.split()[-1])
    assert codes == ["0", "0", "0", "0", "0", "0", "2"]


def test_lambdas_accepts_the_run_folder(files, tmp_path, capsys):
    args = ["--config", str(CONFIG), "--seeds", "0-3", "--outdir", str(tmp_path / "out"), "--print_config"]
    assert sample_main([*args, "--lambdas", files["run"]]) == 0
    assert "solver: euler" in capsys.readouterr().out
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / f"{name}.safetensors").write_bytes(Path(files["lambdas"]).read_bytes())
    for folder, count in ((tmp_path / "two", "2 λ files (a.safetensors, b.safetensors)"), (tmp_path, "0 λ files (*.safetensors)")):
        assert sample_main([*args, "--lambdas", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: folder {folder} holds {count}; pass the λ file itself"
