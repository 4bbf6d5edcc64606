"""The Python API (issue 18 item 4): `dode_lightning.calibrate` and `dode_lightning.load_student`."""
from __future__ import annotations

import pytest
import torch

import dode_lightning
from dode_lightning.distill import rmse, seeded_noise
from dode_lightning.lambda_file import LambdaFileError


def test_calibrate_then_load_student_samples_the_same(tmp_path, digits):
    path = tmp_path / "student.safetensors"
    student = dode_lightning.calibrate(
        {"source": "gmm_digits"}, "ipndm", 4, grid="teacher_dp", dp_steps=30, terminal_zero=False, history=4, data={"batch_size": 16, "class_conditional": False}, output=path
    )
    assert student.nfe == 4 and len(student.sigmas) == 5 and student.metadata["grid"] == "teacher_dp"
    assert student.lambdas.shape == (4, 4, 1) and bool(student.lambdas.abs().sum() > 0)
    loaded = dode_lightning.load_student(path)
    assert torch.equal(loaded.sigmas, student.sigmas) and torch.equal(loaded.lambdas, student.lambdas)
    noise, _ = seeded_noise(range(1_000_000, 1_000_020), (1, 8, 8))
    out = loaded.sample(digits, noise)
    assert torch.equal(out, student.sample(digits, noise)) and out.shape == noise.shape
    exact = digits.exact_endpoint(noise * 80.0, 80.0, sigma_end=float(student.sigmas[-1]))
    assert rmse(out, exact) < rmse(student.solver.sample(digits, noise), exact)  # the D-student beats its base solver
    seen = []
    assert torch.equal(loaded.sample(digits, noise, observe=lambda k, _stage, state: seen.append((k, state.clone()))), out)
    assert [k for k, _ in seen] == list(range(loaded.solver.num_stages)) and torch.equal(seen[-1][1], out)


def test_calibrate_takes_a_bare_network(digits):
    student = dode_lightning.calibrate(digits, "euler", 3, image_shape=(1, 8, 8), data={"batch_size": 8, "class_conditional": False})
    assert student.metadata["denoiser"] == "python:GaussianMixture" and student.metadata["grid"] == "karras"
    with pytest.raises(ValueError, match="image_shape"):
        dode_lightning.calibrate(digits, "euler", 3)


def test_load_student_refuses_a_missing_file(tmp_path):
    with pytest.raises(LambdaFileError, match="does not exist"):
        dode_lightning.load_student(tmp_path / "nothing.safetensors")
    with pytest.raises(LambdaFileError, match=r"holds 0 λ files \(\*\.safetensors\); pass the λ file itself"):
        dode_lightning.load_student(tmp_path)


def test_load_student_takes_the_run_folder_train_py_wrote(tmp_path, digits):
    dode_lightning.calibrate(digits, "euler", 3, image_shape=(1, 8, 8), data={"batch_size": 8, "class_conditional": False}, output=tmp_path / "run" / "lambdas.safetensors")
    student = dode_lightning.load_student(tmp_path / "run")
    assert torch.equal(student.sigmas, dode_lightning.load_student(tmp_path / "run" / "lambdas.safetensors").sigmas)


def test_student_counts_its_network_calls_and_refuses_noise_of_another_shape(digits):
    student = dode_lightning.calibrate(
        {"source": "gmm_digits"}, "ipndm", 3, grid="teacher_dp", dp_steps=20, terminal_zero=False, first_step="mean", data={"batch_size": 8, "class_conditional": False}
    )
    assert student.first_denoised is not None and (student.nfe, student.network_nfe) == (4, 3)
    calls = []

    def counted(x, sigma, class_labels=None):
        calls.append(1)
        return digits(x, sigma, class_labels)

    student.sample(counted, torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert len(calls) == student.network_nfe
    for shape in [(2, 64), (2, 3, 8, 8)]:
        with pytest.raises(ValueError, match=r"calibrated on images of shape \(1, 8, 8\)"):
            student.sample(digits, torch.randn(*shape, dtype=torch.float64))
