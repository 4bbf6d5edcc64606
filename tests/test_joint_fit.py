"""The end-to-end joint fit of step positions and λ (dode_lightning.joint_fit, `model.fit: joint`)."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dode_lightning.cli import train_main
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, holdout_mask, seeded_noise, teacher_targets
from dode_lightning.joint_fit import JointFit, JointFitDiverged, JointSettings, TeacherPath, grid_from_params, hard_rows, step_params, stratified_weights
from dode_lightning.lambda_file import load_lambdas
from dode_lightning.schedules import EDM
from dode_lightning.solvers import LambdaLayout
from tests.test_calibration import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("coordinate", ["log", "karras"])
@pytest.mark.parametrize("terminal_zero", [True, False])
def test_parametrisation_is_monotone_with_fixed_ends(coordinate, terminal_zero):
    sigmas = SolverSetup.resolve("euler", 6, EDM(), "karras", terminal_zero=terminal_zero).build().sigmas
    theta = step_params(sigmas, coordinate)
    torch.testing.assert_close(grid_from_params(theta, sigmas, coordinate), sigmas, rtol=1e-12, atol=0)
    fixed = [0, len(sigmas) - 1] + ([len(sigmas) - 2] if terminal_zero and coordinate == "log" else [])
    for seed in range(5):
        moved = grid_from_params(4 * torch.randn(len(theta), generator=torch.Generator().manual_seed(seed), dtype=torch.float64), sigmas, coordinate)
        assert len(moved) == len(sigmas) and bool((moved[:-1] > moved[1:]).all())
        assert all(float(moved[i]) == float(sigmas[i]) for i in fixed)
    with pytest.raises(ValueError, match="strictly decreasing"):
        step_params(sigmas.flip(0), coordinate)


def test_teacher_path_interpolates_in_log_sigma():
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    states = torch.arange(4, dtype=torch.float64).reshape(4, 1, 1) * torch.ones(4, 2, 3, dtype=torch.float64)
    path = TeacherPath(sigmas, states)
    torch.testing.assert_close(path.at(torch.tensor(2.0, dtype=torch.float64)), states[1])
    torch.testing.assert_close(path.at(torch.tensor(2.0**1.5, dtype=torch.float64)), 0.5 * (states[0] + states[1]))
    torch.testing.assert_close(path.at(torch.tensor(0.0, dtype=torch.float64)), states[3])


def _problem(digits, name="unipc_3", nfe=5, batch=20, history=0, terminal_zero=True, guard=0.0):
    setup = SolverSetup.resolve(name, nfe, EDM(), "karras", terminal_zero=terminal_zero)
    student = setup.build()
    noise = seeded_noise(range(batch), (1, 8, 8))[0]
    teacher, indices = build_teacher(student, setup, 4, "aligned", "unipc_3")
    targets = teacher_targets(teacher, indices, digits, noise)
    layout = LambdaLayout(history or student.num_stages)
    held = holdout_mask(range(batch), guard) if guard else None
    closed = fit_closed_form(student, digits, noise, targets, layout=layout, holdout=held)
    return student, noise, targets, layout, closed, held


def _fit(digits, settings=JointSettings(), **kwargs):
    student, noise, targets, layout, closed, held = _problem(digits, **kwargs)
    name = kwargs.get("name", "unipc_3")
    return JointFit(name, student.sigmas, EDM(), digits, noise, targets[-1], closed.lambdas, layout, settings, lambda_scale=closed.natural_scales(), held=held)


@pytest.mark.parametrize("name,history", [("unipc_3", 0), ("euler", 1), ("ipndm", 2)])
def test_gradient_matches_finite_differences(digits, name, history):
    fit = _fit(digits, name=name, history=history, batch=8, nfe=4)
    with torch.no_grad():  # move off the closed form's optimum so that every λ has a gradient
        fit.phi.add_(0.1 * torch.randn(fit.phi.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        fit.theta.add_(0.2 * torch.randn(fit.theta.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    fit.closure()
    scale = fit.loss_unit  # the closure's gradient is that of the loss relative to the start
    for param in (fit.theta, fit.phi):
        grad = param.grad.clone()
        for i in range(0, param.numel(), max(1, param.numel() // 4)):
            step = 1e-4  # the exact model's loss carries ~1e-7 relative rounding noise: smaller steps drown in it
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    param.view(-1)[i] += sign * step
                values.append(fit.evaluate("train"))
                with torch.no_grad():
                    param.view(-1)[i] -= sign * step
            numeric = (values[0] - values[1]) / (2 * step) / scale
            assert abs(float(grad.view(-1)[i]) - numeric) <= 1e-5 * max(1.0, abs(numeric)), (param.shape, i, float(grad.view(-1)[i]), numeric)


def test_fit_lowers_the_loss_and_keeps_steps_ordered(digits):
    fit = _fit(digits, nfe=5)
    result = fit.fit(8)
    assert result.loss_end < 0.95 * result.loss_start  # measured 0.90
    assert result.held_end is None and result.best_iteration == 8
    start = fit.start_sigmas
    assert bool((result.sigmas[:-1] > result.sigmas[1:]).all())
    assert float(result.sigmas[0]) == float(start[0]) and float(result.sigmas[-1]) == float(start[-1]) == 0.0
    assert not torch.equal(result.sigmas, start)
    assert result.backward_runs >= 1 and result.forward_runs > result.backward_runs


def test_never_ends_worse_than_its_start_on_the_held_out_rows(digits):
    """Held-out rows whose target is the start's own final state: every move is worse there, so the start stays."""
    student, noise, targets, layout, closed, _ = _problem(digits, nfe=5, guard=0.2)
    held = holdout_mask(range(len(noise)), 0.2)
    with torch.no_grad():
        own = student.sample(digits, noise, layout.expand(closed.lambdas, noise.shape[1:]))
    target = torch.where(held.reshape(-1, 1, 1, 1), own, targets[-1])
    fit = JointFit("unipc_3", student.sigmas, EDM(), digits, noise, target, closed.lambdas, layout, lambda_scale=closed.natural_scales(), held=held)
    result = fit.fit(4)
    assert result.best_iteration == 0 and result.held_end == result.held_start
    assert torch.equal(result.sigmas, student.sigmas) and torch.equal(result.lambdas, closed.lambdas.to(torch.float64))


def test_collapsing_steps_stop_in_one_line_naming_iteration_and_stage(digits):
    fit = _fit(digits, JointSettings(optimizer="adam", lr=1e3), nfe=5)
    with pytest.raises(JointFitDiverged, match=r"^the joint fit diverged at iteration 1: steps collapse at stage \d+ .*no λ file written$"):
        fit.step()


def test_non_finite_states_name_the_stage(digits):
    calls = {"n": 0}

    def poisoned(x, sigma, class_labels=None):
        calls["n"] += 1
        out = digits(x, sigma, class_labels)
        return out * float("nan") if calls["n"] > 12 and float(sigma.detach()) < 1.0 else out

    student, noise, targets, layout, closed, _ = _problem(digits, nfe=5)
    fit = JointFit("unipc_3", student.sigmas, EDM(), poisoned, noise, targets[-1], closed.lambdas, layout, lambda_scale=closed.natural_scales())
    with pytest.raises(JointFitDiverged, match=r"iteration 1: non-finite state at stage \d \(σ = "):
        fit.step()


def test_row_weights_equal_repeated_rows(digits):
    """A row of weight 2 counts as that row twice: same loss, same gradient."""
    student, noise, targets, layout, closed, _ = _problem(digits, batch=6)
    weights = torch.tensor([2.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    repeated = torch.cat([noise[:1], noise])
    weighted = JointFit("unipc_3", student.sigmas, EDM(), digits, noise, targets[-1], closed.lambdas, layout, lambda_scale=closed.natural_scales(), weights=weights)
    plain = JointFit("unipc_3", student.sigmas, EDM(), digits, repeated, torch.cat([targets[-1][:1], targets[-1]]), closed.lambdas, layout, lambda_scale=closed.natural_scales())
    assert weighted.loss_start == pytest.approx(plain.loss_start, rel=1e-12)
    weighted.closure(), plain.closure()
    torch.testing.assert_close(weighted.theta.grad, plain.theta.grad, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(weighted.phi.grad, plain.phi.grad, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="one finite positive number per calibration sample"):
        JointFit("unipc_3", student.sigmas, EDM(), digits, noise, targets[-1], closed.lambdas, layout, weights=-weights)


def test_hard_rows_and_stratified_weights():
    reference = torch.zeros(6, 2)
    student = torch.tensor([[0.1, 0], [3, 0], [0, 0.2], [0, 2], [0.5, 0], [0, 0]])
    assert hard_rows(student, reference, 2).tolist() == [1, 3]
    hard, easy = stratified_weights(1000, 50, 100)
    # Each easy row stands for 950 / 100 seeds, each hard row for itself; mean weight 1 over the 150 rows.
    assert easy / hard == pytest.approx(9.5) and (50 * hard + 100 * easy) / 150 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        stratified_weights(100, 100, 1)


def test_train_py_hard_seeds_join_the_joint_fit(tmp_path, capsys, monkeypatch):
    """`joint_pool`: the pool's hardest seeds (closed-form student vs a finer reference) join the fit and are recorded."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = write_tiny_config(tmp_path, "hard", "solver: ipndm, nfe: 4, grid: teacher_dp, dp_steps: 20, terminal_zero: false, history: 4, fit: joint, joint_steps: 3, joint_pool: 60, joint_hard: 5")
    output = tmp_path / "l.safetensors"
    args = ["--config", str(config), "--exact_report", "false", "--trainer.logger", "false", "--model.output", str(output)]
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "hard seeds: 5 of 60 screened seeds" in out, out
    meta = load_lambdas(output)[1]
    assert meta["hard_pool"] == 60 and len(meta["hard_seeds"]) == 5 and all(0 <= s < 60 for s in meta["hard_seeds"])
    # The same seeds as the closed-form student's worst against the reference: rerun hits the cache and agrees.
    assert train_main(args) == 0
    assert load_lambdas(output)[1]["hard_seeds"] == meta["hard_seeds"]


@pytest.mark.parametrize("extra,message", [
    (["--model.fit", "closed_form"], "joint_pool picks hard seeds for the joint fit"),
    (["--model.joint_pool", "20"], "joint_pool counts the seeds screened from data.seed"),
])
def test_train_py_bad_hard_seed_settings_fail_in_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = write_tiny_config(tmp_path, "hard", "solver: ipndm, nfe: 4, fit: joint, history: 4, joint_steps: 2, joint_pool: 60, joint_hard: 5")
    output = tmp_path / "l.safetensors"
    assert train_main(["--config", str(config), "--exact_report", "false", "--trainer.logger", "false", "--model.output", str(output), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not output.exists()


def test_settings_of_another_fit_or_grid_are_named_as_ignored(tmp_path):
    """joint_*, adam_* and dp_* settings that the chosen fit or grid never reads are named in a warning (a config may
    keep them for switching fit or grid on the command line); the defaults and the settings in use are not."""
    from dode_lightning.lightning import DODECalibration

    with pytest.warns(UserWarning) as caught:
        DODECalibration({"source": "gmm_digits"}, "ipndm", 4, fit="closed_form", joint_steps=5, joint_intermediate=0.1, adam_lr=0.5, dp_steps=30)
    messages = [str(w.message) for w in caught]
    assert "joint_steps, joint_intermediate ignored: they configure --model.fit joint only (fit is closed_form, grid the solver default)" in messages
    assert any(m.startswith("adam_lr ignored") for m in messages) and any(m.startswith("dp_steps ignored") for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DODECalibration({"source": "gmm_digits"}, "ipndm", 4, fit="joint", grid="teacher_dp", joint_steps=5, dp_steps=30, adam_steps=300)


def test_hard_seeds_get_their_own_intermediate_targets(tmp_path, capsys, monkeypatch):
    """`joint_pool` with `joint_intermediate`: the teacher trajectory covers the hard seeds outside the batch, row for
    row with the fit's latents (its last state is each row's final target, from the same C-refined teacher)."""
    from dode_lightning import lightning

    monkeypatch.setattr(sys, "argv", ["train.py"])
    fits = []
    monkeypatch.setattr(lightning, "JointFit", lambda *args, **kwargs: fits.append(JointFit(*args, **kwargs)) or fits[-1])
    config = write_tiny_config(tmp_path, "hard", "solver: ipndm, nfe: 4, fit: joint, history: 4, joint_steps: 2, joint_pool: 60, joint_hard: 5, joint_intermediate: 0.5")
    args = ["--config", str(config), "--exact_report", "false", "--trainer.logger", "false", "--model.output", str(tmp_path / "l.safetensors")]
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    fit = fits[-1]
    assert len(fit.noise) > 20 and fit.path.states.shape[1] == len(fit.noise)
    assert float(fit.path.sigmas[-1]) == float(fit.start_sigmas[-1])  # the grid's end: the teacher's final state
    torch.testing.assert_close(fit.path.states[-1].to(torch.float64), fit.target.to(torch.float64), rtol=0, atol=1e-6)


def _train(tmp_path, *extra):
    config = write_tiny_config(tmp_path, "joint", "solver: unipc_3, nfe: 5, fit: joint, history: 4, joint_steps: 4")
    return [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--exact_report", "false", *extra]


def test_train_py_joint_fit_writes_fitted_sigmas_and_logs_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train_main(_train(tmp_path, "--model.output", str(tmp_path / "l.safetensors"))[2:]) == 0, capsys.readouterr().err[-3000:]
    assert "joint fit: final-state MSE" in capsys.readouterr().out
    tensors, meta = load_lambdas(tmp_path / "l.safetensors")
    sigmas = tensors["sigmas"]
    assert len(sigmas) == 6 and bool((sigmas[:-1] > sigmas[1:]).all()) and float(sigmas[0]) == 80.0 and float(sigmas[-1]) == 0.0
    karras = SolverSetup.resolve("unipc_3", 5, EDM(), "karras").build().sigmas
    assert float(sigmas[-2]) == float(karras[-2]) and (sigmas - karras).abs().max() > 1e-3  # σ_min fixed, the rest moved
    assert meta["fit"] == "joint" and meta["grid"] == "joint" and meta["grid_kwargs"]["start_grid"] == "karras"
    from dode_lightning.sampling import DODESampler

    sampler = DODESampler(denoiser={"source": "gmm_digits"}, lambdas=str(tmp_path / "l.safetensors"))
    assert torch.equal(sampler.student.sigmas, sigmas) and torch.equal(sampler.lambdas[..., 0, 0, 0], tensors["lambdas"][..., 0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "sigma/01" in tags and "lambda/stage_01" in tags and "loss/final_state" in tags
    assert len(events.Scalars("sigma/01")) >= 4


def test_train_py_joint_refit_puts_closed_form_lambdas_on_the_fitted_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = _train(tmp_path, "--model.output", str(tmp_path / "l.safetensors"), "--model.joint_lambdas", "false", "--model.joint_refit", "true", "--trainer.logger", "false")
    assert train_main(args[2:]) == 0, capsys.readouterr().err[-3000:]
    tensors, meta = load_lambdas(tmp_path / "l.safetensors")
    student = SolverSetup.resolve("unipc_3", 5, EDM(), "joint", sigmas=tensors["sigmas"]).build()
    noise = seeded_noise(range(20), (1, 8, 8))[0]
    from dode_lightning.gmm import digits_mixture

    teacher, indices = build_teacher(student, SolverSetup.resolve("unipc_3", 5, EDM(), "joint", sigmas=tensors["sigmas"]), 2, "aligned", "unipc_3")
    closed = fit_closed_form(student, digits_mixture(), noise, teacher_targets(teacher, indices, digits_mixture(), noise), layout=LambdaLayout(4))
    torch.testing.assert_close(tensors["lambdas"], closed.lambdas, rtol=1e-9, atol=1e-12)


def test_train_py_joint_fit_with_trajectory_targets(tmp_path, capsys, monkeypatch):
    """`joint_intermediate`: per-stage errors to the teacher trajectory at the moving σ join the final-state loss."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = _train(tmp_path, "--model.output", str(tmp_path / "l.safetensors"), "--model.joint_intermediate", "0.5", "--trainer.logger", "false")
    assert train_main(args[2:]) == 0, capsys.readouterr().err[-3000:]
    assert "joint fit: loss (final state + weighted per-stage MSE)" in capsys.readouterr().out
    assert load_lambdas(tmp_path / "l.safetensors")[1]["fit"] == "joint"


def test_train_py_diverging_joint_fit_fails_in_one_line_without_a_lambda_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    output = tmp_path / "l.safetensors"
    args = _train(tmp_path, "--model.output", str(output), "--model.joint_optimizer", "adam", "--model.joint_lr", "1000", "--trainer.logger", "false")[2:]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]  # the rest is the teacher's progress bar
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert err[-1].startswith("error: the joint fit diverged at iteration 1: steps collapse at stage"), err
    assert not output.exists()


@pytest.mark.slow
def test_joint_fit_over_two_ranks_equals_the_union_batch(tmp_path):
    one = subprocess.run(_train(tmp_path, "--model.output", str(tmp_path / "one.safetensors")), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        _train(tmp_path, "--model.output", str(tmp_path / "two.safetensors"), "--trainer.devices", "2", "--trainer.strategy", "ddp"),
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, _ = load_lambdas(tmp_path / "one.safetensors")
    double, _ = load_lambdas(tmp_path / "two.safetensors")
    # The pooled sums differ from the single-process ones only in summation order (~1e-16 relative), which the
    # history-4 least squares and four L-BFGS iterations amplify to well below 1e-6.
    assert (single["sigmas"] - SolverSetup.resolve("unipc_3", 5, EDM(), "karras").build().sigmas).abs().max() > 1e-3
    torch.testing.assert_close(double["sigmas"], single["sigmas"], rtol=1e-6, atol=0)
    torch.testing.assert_close(double["lambdas"], single["lambdas"], rtol=1e-5, atol=1e-5 * float(single["lambdas"].abs().max()))
