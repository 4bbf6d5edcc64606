"""sample.py as a user meets it: FID that cannot be mismatched, FID edge cases, one-line errors, λ-file settings,
sampling logs apart from calibration, the image grid."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dode_lightning.distill import build_teacher, fit_closed_form, seeded_noise, teacher_targets
from dode_lightning.fid import exact_reference_images, load_reference_npz
from dode_lightning.lambda_file import save_lambdas
from dode_lightning.lightning import ConfigError, build_student
from dode_lightning.sample_cli import fid_main, fid_ref_main, sample_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_digits.yaml"
NOISE = ("GPU available", "TPU available", "litlogger", "LeafSpec")


class FlippedPixels(nn.Module):
    """Another 64-feature detector for 8×8 images: the pixels mirrored left to right."""

    num_features = 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float64).flip(-1) / 127.5 - 1).reshape(len(images), -1)


def not_a_module() -> None:
    return None


def broken_factory() -> nn.Module:
    raise RuntimeError("no weights here")


@pytest.fixture(autouse=True)
def as_from_the_shell(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["sample.py"])
    monkeypatch.chdir(tmp_path)


def _digits_folder(folder: Path, count: int = 40, seed: int = 5) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(exact_reference_images(count, class_conditional=False, seed=seed).numpy()):
        Image.fromarray(image[0], "L").save(folder / f"{i:05d}.png")
    return folder


def _sample(tmp_path: Path, outdir: str, seeds: str = "0-15", *extra: str) -> int:
    return sample_main(["--config", str(CONFIG), "--lambdas", "none", "--seeds", seeds, "--outdir", str(tmp_path / outdir), *extra])


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_reference_of_another_detector_is_refused(tmp_path, capsys):
    folder = _digits_folder(tmp_path / "real")
    assert fid_ref_main(["--images", str(folder), "--out", str(tmp_path / "ref.npz")]) == 0
    capsys.readouterr()
    assert _sample(tmp_path, "out", "0-15", "--fid-ref", str(tmp_path / "ref.npz"), "--fid-detector", "tests.test_sample_usability:FlippedPixels") == 2
    line = _one_error_line(capsys)
    assert "computed with detector 'pixels'" in line and "'tests.test_sample_usability:FlippedPixels'" in line
    assert not (tmp_path / "out").exists()
    assert fid_main(["--images", str(folder), "--fid-ref", str(tmp_path / "ref.npz"), "--fid-detector", "tests.test_sample_usability:FlippedPixels"]) == 2
    assert "computed with detector 'pixels'" in _one_error_line(capsys)


def test_one_default_rule_and_fid_of_an_existing_folder(tmp_path, capsys):
    """fid-ref then sample.py in the README's order, no detector named: both take pixels for 8×8 digits; a reference
    built with another detector becomes the default of runs against it; `fid` scores a folder like sample.py did."""
    folder = _digits_folder(tmp_path / "real")
    assert fid_ref_main(["--images", str(folder), "--out", str(tmp_path / "ref.npz")]) == 0
    with np.load(tmp_path / "ref.npz") as data:
        assert str(data["detector_spec"]) == "pixels" and data["mu"].shape == (64,)
    err = capsys.readouterr().err
    assert "warning: 40 images for 64 features" in err and "images: 100%" in err  # n ≤ d warning, a progress bar
    assert _sample(tmp_path, "out", "0-15", "--fid-ref", str(tmp_path / "ref.npz")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["detector"] == "pixels" and metrics["num_generated"] == 16
    capsys.readouterr()
    assert fid_main(["--images", str(tmp_path / "out"), "--fid-ref", str(tmp_path / "ref.npz")]) == 0
    out = capsys.readouterr().out
    value = float(out.split(": ")[1].split(" ")[0])
    assert value == pytest.approx(metrics["value"], rel=1e-5) and "(n = 16," in out  # grid.png is not a sample
    spec = "tests.test_sample_usability:FlippedPixels"
    assert fid_ref_main(["--images", str(folder), "--out", str(tmp_path / "flipped.npz"), "--fid-detector", spec]) == 0
    assert _sample(tmp_path, "out2", "0-15", "--fid-ref", str(tmp_path / "flipped.npz")) == 0
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["detector"] == spec


def _corrupt_folder(folder: Path) -> Path:
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "c.png").write_bytes((folder / "a.png").read_bytes()[:-20])  # truncated
    return folder


@pytest.mark.parametrize(
    "case,expected",
    [
        ("not_psd", "negative eigenvalue"),
        ("not_symmetric", "not symmetric"),
        ("corrupt_reference_folder", "cannot read image"),
        ("weights_junk", "is not a state_dict for"),
        ("weights_for_pixels", "--fid-weights applies to a <module>:<factory> detector only"),
        ("factory_returns_none", "returned NoneType, not a torch.nn.Module"),
        ("factory_raises", "failed (RuntimeError: no weights here)"),
    ],
)
def test_fid_edge_cases_are_one_line_and_create_nothing(tmp_path, capsys, case, expected):
    ref = tmp_path / "ref.npz"
    extra = ["--fid-ref", str(ref)]
    if case == "not_psd":
        np.savez(ref, mu=np.zeros(64), sigma=-np.eye(64))
    elif case == "not_symmetric":
        sigma = np.eye(64)
        sigma[0, 1] = 0.5
        np.savez(ref, mu=np.zeros(64), sigma=sigma)
    elif case == "corrupt_reference_folder":
        extra = ["--fid-ref", str(_corrupt_folder(tmp_path / "bad"))]
    elif case == "weights_junk":
        (tmp_path / "w.pt").write_bytes(b"not a state dict")
        extra = ["--fid-ref", "exact", "--fid-detector", "tests.test_sample_usability:FlippedPixels", "--fid-weights", str(tmp_path / "w.pt")]
    elif case == "weights_for_pixels":
        (tmp_path / "w.pt").write_bytes(b"x")
        extra = ["--fid-ref", "exact", "--fid-weights", str(tmp_path / "w.pt")]
    elif case == "factory_returns_none":
        extra = ["--fid-ref", "exact", "--fid-detector", "tests.test_sample_usability:not_a_module"]
    elif case == "factory_raises":
        extra = ["--fid-ref", "exact", "--fid-detector", "tests.test_sample_usability:broken_factory"]
    assert _sample(tmp_path, "out", "0-3", *extra) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_corrupt_images_in_fid_ref_and_fid_are_one_line(tmp_path, capsys):
    folder = _corrupt_folder(tmp_path / "bad")
    assert fid_ref_main(["--images", str(folder), "--out", str(tmp_path / "ref.npz")]) == 2
    assert "cannot read image" in _one_error_line(capsys) and not (tmp_path / "ref.npz").exists()
    assert fid_main(["--images", str(folder), "--fid-ref", "exact"]) == 2
    assert "cannot read image" in _one_error_line(capsys)


def test_non_psd_sigma_is_refused_when_loaded():
    sigma = np.diag(np.r_[np.ones(3), -1e-3])
    path = Path("ref.npz")
    np.savez(path, mu=np.zeros(4), sigma=sigma)
    with pytest.raises(ConfigError, match="negative eigenvalue"):
        load_reference_npz(path, 4)
    np.savez(path, mu=np.zeros(4), sigma=np.diag(np.r_[np.ones(3), -1e-15]))  # rounding of a singular covariance
    load_reference_npz(path, 4)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config", "x.yaml"], "the following arguments are required: --lambdas, --seeds, --outdir; see python sample.py --help"),
        (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
        (["--trainer.devices", "abc"], "cannot set up the Trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
        (["--format", "gif"], "argument --format: invalid choice: 'gif'"),
    ],
)
def test_parse_errors_are_one_line(tmp_path, capsys, args, expected):
    base = ["--config", str(CONFIG), "--lambdas", "none", "--seeds", "0-3", "--outdir", str(tmp_path / "out")]
    argv = args if args[0] == "--config" else base + args
    assert sample_main(argv) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_fid_subcommand_parse_errors_are_one_line(capsys):
    assert fid_ref_main(["--images", "x"]) == 2
    assert "the following arguments are required: --out; see python sample.py fid-ref --help" in _one_error_line(capsys)
    assert fid_main(["--images", "x", "--fid-ref", "exact", "--detector", "pixels"]) == 2
    assert "unrecognized arguments: --detector pixels" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, capsys):
    assert _sample(tmp_path, "out", "0-3", "--trainer.accelerator", "gpu") == 2
    assert "--trainer.accelerator cpu" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def _lambda_file(path: Path, nfe: int) -> Path:
    built = build_student({"source": "gmm_digits"}, "heun", nfe)
    teacher, indices = build_teacher(built.solver, built.setup, 4, "aligned")
    noise, _ = seeded_noise(range(20), built.loaded.image_shape)
    fit = fit_closed_form(built.solver, built.loaded.denoiser, noise, teacher_targets(teacher, indices, built.loaded.denoiser, noise))
    return save_lambdas(path, {"lambdas": fit.lambdas, "sigmas": built.solver.sigmas}, {**built.metadata(), "class_conditional": False})


def test_solver_nfe_and_grid_come_from_the_lambda_file(tmp_path, capsys):
    lam = _lambda_file(tmp_path / "lam.safetensors", 5)  # the config says NFE 9
    args = ["--config", str(CONFIG), "--lambdas", str(lam), "--seeds", "0-3", "--outdir", str(tmp_path / "out")]
    assert sample_main([*args, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "nfe: 5" in printed and "solver: heun" in printed and "grid: karras" in printed
    assert not (tmp_path / "out").exists()
    assert sample_main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identity"]["nfe"] == 5 and manifest["identity"]["grid"] == "karras"
    assert sample_main([*args, "--model.nfe", "9"]) == 2
    assert "--model.nfe 9 conflicts with the λ file, fitted with nfe 5" in _one_error_line(capsys)


def test_help_lists_trainer_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.KEY VALUE" in text and "accelerator, strategy, devices" in text and "--print_config" in text
    assert "--fid-detector" in text and "the detector the reference npz records" in text


def test_sampling_logs_apart_only_with_fid_and_writes_a_grid(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _sample(tmp_path, "plain", "0-9") == 0
    assert not (tmp_path / "runs").exists()  # nothing to log: no TensorBoard run at all
    with Image.open(tmp_path / "plain" / "grid.png") as grid:
        assert grid.size == (8 * 64 + 7 * 4, 2 * 64 + 4)  # 10 seeds in rows of 8, 8×8 digits upscaled ×8, 4 px apart
        cells = np.asarray(grid)
    first = np.asarray(Image.open(tmp_path / "plain" / "000000" / "000000.png"))
    second = np.asarray(Image.open(tmp_path / "plain" / "000000" / "000001.png"))
    assert np.array_equal(cells[:64:8, :64:8], first) and np.array_equal(cells[:64:8, 68:132:8], second)
    assert (cells[64:68, :] == 128).all() and (cells[:, 64:68] == 128).all()  # grey gaps: cells never merge
    assert _sample(tmp_path, "scored", "0-9", "--fid-ref", "exact", "--fid-ref-count", "50") == 0
    captured = capsys.readouterr()
    for noise in NOISE:
        assert noise not in captured.out + captured.err
    assert "reference (exact samples)" in captured.err
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir()] == ["sampling"]  # not under the calibration run's name (gmm_digits)
    (run,) = (runs / "sampling").iterdir()
    assert run.name == "heun_nfe9_base"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "fid/value" in events.Tags()["scalars"] and "samples/grid" in events.Tags()["images"]
