"""Step positions as calibrated parameters (issue 18 item 1): the λ file's σ list, grids ending at σ_min."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dode_lightning.cli import train_main
from dode_lightning.lambda_file import FORMAT_1, LambdaFileError, load_lambdas, save_lambdas
from dode_lightning.lightning import ConfigError, build_student
from dode_lightning.sampling import DODESampler
from dode_lightning.solvers import NFEError, make_solver


def _meta(solver: str = "ipndm", nfe: int = 4, grid: str = "karras") -> dict:
    return {"solver": solver, "nfe": nfe, "grid": grid, "grid_kwargs": {}, "schedule": 'EDM{"t_max": 80.0, "t_min": 0.002}', "denoiser": "gmm_digits"}


def test_make_solver_on_given_sigmas():
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    solver = make_solver("ipndm", 4, sigmas=sigmas)
    assert torch.equal(solver.sigmas, sigmas) and solver.nfe == 4
    assert make_solver("heun", 7, sigmas=sigmas).nfe == 7  # 4 steps, the last to σ = 0 with one evaluation
    with pytest.raises(NFEError, match="takes NFE 4, not 5"):
        make_solver("ipndm", 5, sigmas=sigmas)
    with pytest.raises(ValueError, match="not strictly decreasing: σ_1 = 10, σ_2 = 10"):
        make_solver("ipndm", 4, sigmas=torch.tensor([80.0, 10.0, 10.0, 0.1, 0.0]))


def test_lambda_file_holds_its_sigmas_and_refuses_bad_ones(tmp_path):
    sigmas = torch.tensor([80.0, 7.0, 0.9, 0.05, 0.002], dtype=torch.float64)  # N + 1 points ending at σ_min
    path = save_lambdas(tmp_path / "l.safetensors", {"lambdas": torch.ones(4), "sigmas": sigmas}, _meta(grid="teacher_dp"))
    tensors, _ = load_lambdas(path)
    assert tensors["sigmas"].dtype == torch.float64 and torch.equal(tensors["sigmas"], sigmas)
    with pytest.raises(LambdaFileError, match="not strictly decreasing"):
        save_lambdas(tmp_path / "rising.safetensors", {"lambdas": torch.ones(4), "sigmas": sigmas.flip(0)}, _meta())
    assert not (tmp_path / "rising.safetensors").exists()
    # Files written by something else: the σ list is checked on loading, one line each.
    crafted = [
        (sigmas[[0, 2, 1, 3, 4]], "not strictly decreasing"),
        (sigmas[:4], "give ipndm 3 stages, but it holds λ for 4"),
        (torch.tensor([80.0, float("nan"), 1.0, 0.1, 0.0]), "σ_1 = nan"),
    ]
    for bad, message in crafted:
        save_file({"lambdas": torch.ones(4), "sigmas": bad}, str(tmp_path / "bad.safetensors"), {"format": "dode-lightning/lambdas/2", "metadata": json.dumps(_meta())})
        with pytest.raises(LambdaFileError, match=message) as err:
            load_lambdas(tmp_path / "bad.safetensors")
        assert "\n" not in str(err.value) and "refit with train.py" in str(err.value)


def test_older_lambda_file_loads_with_its_grid_rebuilt(tmp_path):
    solver = make_solver("heun", 5)
    evaluations = torch.linspace(80, 1, solver.num_stages, dtype=torch.float64)  # format 1 kept the evaluation σ here
    save_file({"lambdas": torch.zeros(5), "sigmas": evaluations}, str(tmp_path / "old.safetensors"), {"format": FORMAT_1, "metadata": json.dumps(_meta("heun", 5))})
    tensors, meta = load_lambdas(tmp_path / "old.safetensors")
    assert torch.equal(tensors["sigmas"], solver.sigmas) and torch.equal(tensors["eval_sigmas"], evaluations)
    unknown = {**_meta("heun", 5), "schedule": "VPDiscrete{\"betas_sha256\": \"0\", \"num_timesteps\": 7}"}
    save_file({"lambdas": torch.zeros(5)}, str(tmp_path / "vp.safetensors"), {"format": FORMAT_1, "metadata": json.dumps(unknown)})
    with pytest.raises(LambdaFileError, match="older λ file without its σ list"):
        load_lambdas(tmp_path / "vp.safetensors")


def test_sampler_runs_on_the_files_sigmas(tmp_path):
    sigmas = torch.tensor([80.0, 9.0, 1.5, 0.2, 0.0], dtype=torch.float64)  # no named grid gives these
    lambdas = torch.tensor([0.0, 0.1, -0.1, 0.05], dtype=torch.float64)
    path = save_lambdas(tmp_path / "l.safetensors", {"lambdas": lambdas, "sigmas": sigmas}, {**build_student(None, "ipndm", 4).metadata(), "grid": "teacher_dp"})
    sampler = DODESampler(lambdas=str(path))
    assert torch.equal(sampler.student.sigmas, sigmas)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = make_solver("ipndm", 4, sigmas=sigmas).sample(sampler.built.loaded.denoiser, noise, lambdas)
    assert torch.allclose(sampler.student.sample(sampler.built.loaded.denoiser, noise, sampler.lambdas), direct, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="placed by calibration"):
        DODESampler(solver="ipndm", nfe=4, grid="teacher_dp")


def test_train_py_builds_a_grid_that_ends_at_sigma_min(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {logger: false}\nmodel: {denoiser: {source: gmm_digits}, solver: ipndm, nfe: 4}\ndata: {batch_size: 8, scale: 2, cache_dir: null}\n")
    out = tmp_path / "l.safetensors"
    assert train_main(["--config", str(config), "--model.terminal_zero", "false", "--model.output", str(out), "--exact_report", "false"]) == 0
    tensors, meta = load_lambdas(out)
    assert meta["grid_kwargs"]["terminal_zero"] is False and len(tensors["sigmas"]) == 5
    assert float(tensors["sigmas"][-1]) == pytest.approx(0.002) and torch.equal(tensors["sigmas"], DODESampler(lambdas=str(out)).student.sigmas)
