"""The shipped configs parse, name their checkpoint when it is missing, and run through train.py on fixture files."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dode_lightning.lambda_file import load_lambdas
from tests.conftest import fixture_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _train(tmp_path, config, *extra):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--trainer.logger", "false",
         "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false", *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def test_every_config_is_listed():
    assert {c.name for c in CONFIGS} == {
        "gmm_digits.yaml", "edm_digits_net.yaml", "edm_ffhq.yaml", "edm_cifar10.yaml", "edm_imagenet64.yaml", "ddpm_cifar10.yaml",
        "sd_latent.yaml", "gmm_digits_flow.yaml", "gmm_digits_best.yaml", "edm_digits_net_best.yaml", "gmm_digits_budget.yaml",
    }


# Configs whose model ships with the package (built in, or a file in the repository).
OFFLINE = ("gmm_digits.yaml", "gmm_digits_flow.yaml", "edm_digits_net.yaml", "gmm_digits_best.yaml", "edm_digits_net_best.yaml", "gmm_digits_budget.yaml")


@pytest.mark.parametrize("config,extra", [
    ("gmm_digits_best.yaml", ("--model.joint_pool", "40", "--model.joint_hard", "2", "--model.joint_steps", "2")),
    ("edm_digits_net_best.yaml", ("--model.joint_steps", "2")),
    ("gmm_digits_budget.yaml", ()),
])
def test_best_configs_place_the_steps_on_the_teacher_trajectory(tmp_path, config, extra):
    out = tmp_path / "l.safetensors"
    result = _train(tmp_path, ROOT / "configs" / config, "--model.nfe", "3", "--data.batch_size", "4", "--model.dp_steps", "12",
                    "--exact_report", "false", "--model.output", str(out), *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    tensors, meta = load_lambdas(out)
    start = meta["grid_kwargs"]["start_grid"] if meta["grid"] == "joint" else meta["grid"]  # the joint fit starts from the placement
    assert start == "teacher_dp" and meta["fit"] == "joint" and meta["history"] == 10
    if config.startswith("gmm_digits"):  # 3 network calls, 4 steps: the first answered by the stored x̂₀
        assert meta["solver"] == "ipndm" and meta["first_step"] == "mean" and meta["network_nfe"] == 3 and len(tensors["sigmas"]) == 5
        if config == "gmm_digits_best.yaml":
            assert meta["hard_pool"] == 40 and len(meta["hard_seeds"]) == 2
        else:
            assert "hard_seeds" not in meta and meta["grid_kwargs"]["iterations"] == 15
    else:
        assert meta["solver"] == "unipc_3" and "hard_seeds" not in meta and meta["first_step"] == "mean" and len(tensors["sigmas"]) == 5


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name not in OFFLINE], ids=lambda c: c.name)
def test_missing_checkpoint_names_the_file_and_the_release(tmp_path, config):
    result = _train(tmp_path, config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "checkpoints/" in lines[-1]
    assert ("nvlabs-fi-cdn" in lines[-1]) or ("google/ddpm-cifar10-32" in lines[-1])
    if config.name == "sd_latent.yaml":
        assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created: no runs/, no cache


def _train_tiny(tmp_path, config: str, denoiser: dict, *extra: str):
    """Run a shipped config on a fixture checkpoint at toy size (NFE 3, C = 2, |B| = 2); the λ file it wrote."""
    out = tmp_path / "l.safetensors"
    result = _train(
        tmp_path, ROOT / "configs" / config, "--model.denoiser", json.dumps(denoiser),
        "--model.nfe", "3", "--data.scale", "2", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
        "--model.output", str(out), *extra,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return load_lambdas(out)


def test_edm_config_runs_on_the_fixture_pickle(tmp_path):
    pickle = fixture_path("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.pkl")
    denoiser = {"source": "edm_pickle", "path": str(pickle)}
    tensors, meta = _train_tiny(tmp_path, "edm_cifar10.yaml", denoiser, "--data.class_conditional", "false")
    assert meta["solver"] == "heun" and meta["denoiser"] == hashlib.sha256(pickle.read_bytes()).hexdigest()
    assert tensors["lambdas"].shape == (3,)


def test_diffusers_config_runs_on_the_fixture_folder(tmp_path):
    pytest.importorskip("diffusers")
    folder = fixture_path("diffusers", "tiny-ddpm")
    tensors, meta = _train_tiny(tmp_path, "ddpm_cifar10.yaml", {"source": "diffusers", "path": str(folder)})
    assert meta["solver"] == "ddim" and meta["schedule"].startswith("VPDiscrete") and meta["state_dtype"] == "float32"
    assert bool((tensors["lambdas"] != 0).all())  # noise-side DDIM fits every λ, λ_0 included


def test_digits_net_config_calibrates_the_shipped_network_from_another_directory(tmp_path):
    """The config names the network as package data, so train.py finds it from any working directory."""
    network = ROOT / "dode_lightning" / "data" / "edm_digits_net.pkl"
    out = tmp_path / "l.safetensors"
    result = _train(tmp_path, ROOT / "configs" / "edm_digits_net.yaml", "--model.nfe", "3", "--data.scale", "2", "--data.batch_size", "2", "--model.output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    tensors, meta = load_lambdas(out)
    assert meta["solver"] == "heun" and meta["denoiser"] == hashlib.sha256(network.read_bytes()).hexdigest()
    assert tensors["lambdas"].shape == (3,) and bool((tensors["lambdas"][1:] != 0).all())


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch, capsys):
    """A relative denoiser path in a config file is looked up beside the config (not in the working directory), a
    command-line one in the working directory, and "not found" names the directory looked in."""
    from dode_lightning.cli import train_main
    from dode_lightning.sample_cli import sample_main

    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    config = tmp_path / "cfg" / "c.yaml"
    config.write_text("trainer: {logger: false}\nmodel: {denoiser: {source: edm_pickle, path: nets/net.pkl}, nfe: 3}\ndata: {scale: 2, batch_size: 2, cache_dir: null}\n")
    monkeypatch.chdir(tmp_path / "work")
    sampling = ["--lambdas", "none", "--seeds", "0", "--outdir", str(tmp_path / "out")]
    for run in (lambda *extra: train_main(["--config", str(config), *extra]), lambda *extra: sample_main(["--config", str(config), *sampling, *extra])):
        assert run() == 2
        assert f"net.pkl not found in {tmp_path / 'cfg' / 'nets'}/" in capsys.readouterr().err
        assert run("--model.denoiser", '{"source": "edm_pickle", "path": "./nets/net.pkl"}') == 2
        assert f"net.pkl not found in {tmp_path / 'work' / 'nets'}/" in capsys.readouterr().err
    (tmp_path / "cfg" / "nets").mkdir()
    (tmp_path / "cfg" / "nets" / "net.pkl").write_bytes((ROOT / "dode_lightning" / "data" / "edm_digits_net.pkl").read_bytes())
    assert sample_main(["--config", str(config), *sampling, "--eval-batch", "1"]) == 0
