"""`model.first_step: mean`: the student's first evaluation (at σ_max) answered by the calibration batch's mean x̂₀."""
import sys

import pytest
import torch

from dode_lightning.api import load_student
from dode_lightning.cli import train_main
from dode_lightning.denoisers import FirstStepMean, eps_and_denoised
from dode_lightning.distill import seeded_noise
from dode_lightning.lambda_file import load_lambdas
from tests.test_calibration import write_tiny_config


def test_first_step_mean_answers_only_the_start_sigma(digits):
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    constant = torch.full((1, 8, 8), 0.25, dtype=torch.float64)
    wrapped = FirstStepMean(digits, 80.0, constant)
    assert torch.equal(wrapped(x * 80, torch.tensor(80.0, dtype=torch.float64)), constant.expand(3, 1, 8, 8))
    sigma = torch.tensor(2.0, dtype=torch.float64)
    assert torch.equal(wrapped(x, sigma), digits(x, sigma))
    eps, denoised = eps_and_denoised(wrapped, x * 80, torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(eps, (x * 80 - constant) / 80)  # ε̂ = (x − x̂₀)/σ of the stored x̂₀
    torch.testing.assert_close(eps_and_denoised(wrapped, x, sigma)[1], digits(x, sigma))


def _calibrate(tmp_path, capsys, *extra):
    config = write_tiny_config(tmp_path, "first", "solver: ipndm, nfe: 3, history: 3, first_step: mean")
    output = tmp_path / "l.safetensors"
    code = train_main(["--config", str(config), "--exact_report", "false", "--trainer.logger", "false", "--model.output", str(output), *extra])
    return code, output, capsys.readouterr()


def test_train_py_stores_the_batch_mean_and_samplers_call_the_network_nfe_times(tmp_path, capsys, monkeypatch, digits):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    code, output, captured = _calibrate(tmp_path, capsys)
    assert code == 0, captured.err[-3000:]
    assert "ipndm, NFE 3 (+ the stored first step)" in captured.out
    tensors, meta = load_lambdas(output)
    assert meta["first_step"] == "mean" and meta["network_nfe"] == 3 and meta["nfe"] == 4 and len(tensors["sigmas"]) == 5
    noise = seeded_noise(range(20), (1, 8, 8))[0].to(torch.float64)
    sigma = torch.tensor(80.0, dtype=torch.float64)
    torch.testing.assert_close(tensors["first_denoised"], digits(noise * 80, sigma).mean(0), rtol=1e-12, atol=1e-12)

    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(float(torch.as_tensor(sigma)))
        return digits(x, sigma, class_labels)

    student = load_student(output)
    out = student.sample(counting, noise)
    assert len(calls) == 3 and 80.0 not in calls
    from dode_lightning.sampling import DODESampler

    sampler = DODESampler(denoiser={"source": "gmm_digits"}, lambdas=str(output))
    assert (sampler.network_nfe, sampler.student.nfe) == (3, 4)  # sample.py's line and TensorBoard run speak of 3
    with torch.no_grad():
        again = sampler.student.sample(sampler.denoiser, noise, sampler.lambdas)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-12)  # sample.py's sampler = load_student


def test_k_diffusion_sampler_answers_the_first_step_and_calls_the_model_nfe_times(tmp_path, capsys, monkeypatch, digits):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    code, output, _ = _calibrate(tmp_path, capsys)
    assert code == 0
    from dode_lightning.k_diffusion import sampler_from_lambda_file

    sample, sigmas = sampler_from_lambda_file(output)
    calls, steps = [], []

    def model(x, sigma, **extra_args):
        calls.append(float(sigma[0]))
        return digits(x, sigma[0])

    noise = seeded_noise(range(1_000_000, 1_000_006), (1, 8, 8))[0].to(torch.float64)
    out = sample(model, noise * sigmas[0], sigmas, callback=lambda info: steps.append(info["i"]), disable=True)
    assert len(calls) == 3 and float(sigmas[0]) not in calls and steps == [0, 1, 2, 3]
    torch.testing.assert_close(out, load_student(output).sample(digits, noise), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"calibrated on images of shape \(1, 8, 8\)"):
        sample(model, torch.zeros(2, 3, 8, 8, dtype=torch.float64), sigmas, disable=True)


def test_first_step_mean_refuses_a_class_conditional_run_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    code, output, captured = _calibrate(tmp_path, capsys, "--data.class_conditional", "true")
    assert code == 2 and not output.exists()
    assert captured.err.strip().splitlines()[-1].startswith("error: first_step mean needs an unconditional model")


def test_sample_py_takes_the_nfe_train_py_was_given(tmp_path, capsys, monkeypatch):
    """A first-step λ file's solver has N + 1 stages; sample.py speaks of (and accepts) the N network calls."""
    import subprocess

    from tests.test_calibration import ROOT

    monkeypatch.setattr(sys, "argv", ["train.py"])
    code, output, _ = _calibrate(tmp_path, capsys)
    assert code == 0
    config = tmp_path / "first.yaml"
    run = [sys.executable, str(ROOT / "sample.py"), "--config", str(config), "--lambdas", str(output), "--seeds", "0-3"]
    ok = subprocess.run([*run, "--outdir", str(tmp_path / "a"), "--model.nfe", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "ipndm, NFE 3 (+ the stored first step)" in ok.stdout
    wrong = subprocess.run([*run, "--outdir", str(tmp_path / "b"), "--model.nfe", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert wrong.returncode == 2 and "--model.nfe 4 conflicts with the λ file, fitted with nfe 3" in wrong.stderr
