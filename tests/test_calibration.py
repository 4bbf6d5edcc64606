import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from scipy.optimize import minimize_scalar

from dode_lightning.cli import train_main
from dode_lightning.distill import (
    SolverSetup,
    build_teacher,
    fit_closed_form,
    rmse,
    seeded_noise,
    teacher_targets,
)
from dode_lightning.lambda_file import LambdaFileError, load_lambdas, save_lambdas
from dode_lightning.lightning import DODECalibration, TeacherTargets
from dode_lightning.schedules import EDM, make_schedule
from dode_lightning.solvers import Stage, make_solver, run_stages

ROOT = Path(__file__).resolve().parents[1]


def _problem(digits, name="heun", nfe=9, schedule=None, mode="aligned", scale=10, seeds=range(100), labels=False):
    setup = SolverSetup.resolve(name, nfe, schedule or EDM())
    student = setup.build()
    teacher, indices = build_teacher(student, setup, scale, mode)
    noise, class_labels = seeded_noise(seeds, (1, 8, 8), 10 if labels else 0)
    targets = teacher_targets(teacher, indices, digits, noise, class_labels)
    return student, teacher, noise, class_labels, targets


def test_closed_form_equals_brute_force_line_search(digits):
    student, _, noise, _, targets = _problem(digits, "heun", 7)
    fit = fit_closed_form(student, digits, noise, targets)
    brute = []

    def line_search(k: int, stage: Stage) -> float:
        loss = lambda lam: float(((targets[k] - stage.base - lam * stage.delta) ** 2).sum())  # noqa: E731
        best = minimize_scalar(loss, bracket=(-1.0, 1.0), method="brent", options={"xtol": 1e-14}).x
        brute.append((k, best))
        return best

    run_stages(student.stages(student.init_state(noise)), digits, line_search)
    assert len(brute) == sum(student.lambda_fitted) == student.num_stages - 1
    for k, best in brute:
        assert float(fit.lambdas[k]) == pytest.approx(best, rel=1e-8, abs=1e-12)
    assert float(fit.lambdas[0]) == 0.0  # λ_0 ≡ 0 on the EDM side
    assert bool((fit.loss_fit <= fit.loss_base + 1e-15).all())


def test_official_units_give_the_same_samples(digits):
    """Fitting with Δ' = Δ/b (the official folded unit) gives λ' = b·λ and the same corrected states."""
    student, _, noise, _, targets = _problem(digits, "euler", 6)
    fit = fit_closed_form(student, digits, noise, targets)

    def folded():
        gen = student.stages(student.init_state(noise))
        message = next(gen)
        try:
            while True:
                if isinstance(message, Stage):
                    delta = None if message.delta is None else message.delta / message.coeff
                    message = Stage(message.base, delta, torch.ones_like(message.coeff), message.sigma, message.sigma_next)
                message = gen.send((yield message))
        except StopIteration as stop:
            return stop.value

    class Folded:
        num_stages, sigmas, scales, unit_prior = student.num_stages, student.sigmas, student.scales, student.unit_prior

        def stages(self, x):
            return folded()

        init_state = student.init_state

    official = fit_closed_form(Folded(), digits, noise, targets)
    torch.testing.assert_close(official.lambdas, fit.lambdas * fit.coeffs, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(official.loss_fit, fit.loss_fit, rtol=1e-10, atol=1e-16)


def test_aligned_self_teacher_gives_zero_lambda(digits):
    """method.md §1 invariant 2: the student's own solver on its own grid (C = 1) leaves nothing to fit."""
    for name, schedule in (("euler", EDM()), ("ddim", make_schedule("vp_linear"))):
        student, teacher, noise, _, targets = _problem(digits, name, 5, schedule, scale=1, seeds=range(8))
        assert teacher.nfe == student.nfe
        fit = fit_closed_form(student, digits, noise, targets)
        assert float(fit.lambdas.abs().max()) < 1e-10


def test_paper_mode_index_rule_by_hand():
    edm = EDM()
    setup = SolverSetup.resolve("heun", 5, edm)
    teacher, indices = build_teacher(setup.build(), setup, 2, "paper")
    assert indices == [2, 4, 6, 8, 10] and teacher.nfe == 10  # M = C·(2N−1) = 10, xs[(j+1)·C]
    vp = make_schedule("vp_linear")
    setup = SolverSetup.resolve("ddim", 4, vp)
    teacher, indices = build_teacher(setup.build(), setup, 10, "paper")
    assert indices == [10, 20, 30, 40]
    timesteps = [round(float(t)) for t in vp.sigma_inv(teacher.sigmas[:-1])] + [-1]
    assert timesteps[0] == 975 and [timesteps[i] for i in indices] == [725, 475, 225, -1]
    setup = SolverSetup.resolve("ddim", 200, vp)
    teacher, indices = build_teacher(setup.build(), setup, 10, "paper")
    assert teacher.nfe == 1000 and indices[:3] == [5, 10, 15] and indices[-1] == 1000  # M = min(T, C·N)


def test_aligned_targets_sit_at_the_student_noise_levels():
    setup = SolverSetup.resolve("heun", 5, EDM())
    student = setup.build()
    teacher, indices = build_teacher(student, setup, 2, "aligned")
    assert indices == [4, 4, 8, 8, 9]  # 2C sub-steps per non-final interval, terminal step unrefined
    assert teacher.nfe == 2 * 2 * (3 - 1) + 1
    torch.testing.assert_close(teacher.sigmas[indices], student.target_sigmas, rtol=0, atol=0)
    vp = make_schedule("vp_linear")
    setup = SolverSetup.resolve("ddim", 4, vp)
    student = setup.build()
    teacher, indices = build_teacher(student, setup, 10, "aligned")
    torch.testing.assert_close(teacher.sigmas[indices], student.target_sigmas, rtol=0, atol=0)
    steps = [round(float(t)) for t in vp.sigma_inv(teacher.sigmas[:-1])]
    assert steps[:3] == [750, 725, 700] and steps[-2:] == [25, 0]


@pytest.mark.parametrize("name,nfe", [("euler", 5), ("heun", 9)])
def test_d_student_beats_base_on_held_out_seeds(digits, name, nfe):
    student, _, noise, _, targets = _problem(digits, name, nfe)
    lambdas = fit_closed_form(student, digits, noise, targets).lambdas
    held_out, _ = seeded_noise(range(5000, 5100), (1, 8, 8))
    exact = digits.exact_endpoint(student.init_state(held_out), float(student.sigmas[0]))
    base = rmse(student.sample(digits, held_out), exact)
    d_ode = rmse(student.sample(digits, held_out, lambdas), exact)
    print(f"{name} NFE {nfe}: base {base:.4f}, D {d_ode:.4f} ({d_ode / base:.2f}×)")
    assert d_ode < 0.8 * base


def test_seeded_noise_depends_only_on_the_seed():
    a, la = seeded_noise([3, 4, 5], (1, 8, 8), 10)
    b, lb = seeded_noise([5, 4], (1, 8, 8), 10)
    assert torch.equal(a[2], b[0]) and torch.equal(la[1], lb[1])
    expected = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(4)).double()
    assert torch.equal(a[1], expected)
    assert la.sum(1).tolist() == [1.0, 1.0, 1.0]


def test_lambda_file_round_trip_and_mismatch(tmp_path):
    meta = {"solver": "heun", "nfe": 9, "grid": "karras", "grid_kwargs": {}, "schedule": "EDM{}", "denoiser": "gmm_digits", "seeds": [0, 99]}
    path = save_lambdas(tmp_path / "l.safetensors", {"lambdas": torch.arange(9.0, dtype=torch.float64), "sigmas": make_solver("heun", 9).sigmas}, meta)
    tensors, loaded = load_lambdas(path, expect={"solver": "heun", "nfe": 9, "denoiser": "gmm_digits"})
    assert torch.equal(tensors["lambdas"], torch.arange(9.0, dtype=torch.float64)) and loaded == meta
    with pytest.raises(LambdaFileError, match=r"nfe=9 \(this run: 5\)"):
        load_lambdas(path, expect={"solver": "heun", "nfe": 5})
    with pytest.raises(LambdaFileError, match="denoiser='gmm_digits'"):
        load_lambdas(path, expect={"denoiser": "sha256:abc"})
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(LambdaFileError, match="not a readable λ file"):
        load_lambdas(tmp_path / "junk.safetensors")
    with pytest.raises(LambdaFileError, match="does not exist"):
        load_lambdas(tmp_path / "missing.safetensors")
    with open(tmp_path / "checkpoint.safetensors", "wb") as handle:  # sparse: a model checkpoint passed by mistake
        handle.truncate(300 * 2**20)
    with pytest.raises(LambdaFileError, match="is 300 MiB, far more than a λ file holds"):
        load_lambdas(tmp_path / "checkpoint.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _fit(tmp_path, fit="closed_form", cache="cache", **model):
    module = DODECalibration(denoiser={"source": "gmm_digits"}, fit=fit, **{"solver": "euler", "nfe": 5, **model})
    data = TeacherTargets(scale=10, batch_size=40, cache_dir=str(tmp_path / cache), class_conditional=False)
    calls = []
    module.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    return module, data, len(calls)


def test_cache_hit_skips_the_teacher_and_corrupt_cache_is_rebuilt(tmp_path):
    first, data, calls_first = _fit(tmp_path)
    assert not data.cache_hit and data.teacher_nfe == 41
    second, data, calls_second = _fit(tmp_path)
    assert data.cache_hit
    assert calls_first - calls_second == 41  # exactly the teacher's evaluations were skipped
    assert torch.equal(first.lambdas, second.lambdas)
    (cache_file,) = (tmp_path / "cache").glob("targets-*.pt")
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        third, data, calls_third = _fit(tmp_path)
    assert not data.cache_hit and calls_third == calls_first
    assert torch.equal(third.lambdas, first.lambdas)
    torch.load(cache_file, weights_only=True)  # rebuilt, and loadable without code execution


def test_adam_reaches_the_closed_form_objective(tmp_path):
    module, _, _ = _fit(tmp_path, fit="compare", adam_steps=300, adam_lr=0.1)
    comparison = module.comparison
    closed = float(comparison["closed_form"].loss_fit.sum())
    adam = float(comparison["adam"].loss_fit.sum())
    print(f"closed form {closed:.6e} in {comparison['closed_form_seconds']:.3f} s; Adam {adam:.6e} after {comparison['adam_iterations']} iterations in {comparison['adam_seconds']:.2f} s")
    assert comparison["adam_iterations"] == 300
    assert adam <= closed * 1.01
    assert torch.equal(module.lambdas.detach(), comparison["closed_form"].lambdas)  # compare keeps the closed form
    assert not module.denoiser.training and all(not p.requires_grad for p in module.denoiser.parameters())
    assert [p for group in module.optimizers().optimizer.param_groups for p in group["params"]] == [module.lambdas]


def write_tiny_config(tmp_path, name: str, model: str):
    """A train.py config on the built-in model with 20 seeds, C = 2, logging under tmp_path/runs/<name>."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false, logger: {class_path: pytorch_lightning.loggers.TensorBoardLogger, init_args: {save_dir: "
        + json.dumps(str(tmp_path / "runs"))
        + f", name: {name}}}}}}}\n"
        f"model: {{denoiser: {{source: gmm_digits}}, {model}}}\n"
        "data: {scale: 2, batch_size: 20, class_conditional: false, cache_dir: " + json.dumps(str(tmp_path / "cache")) + "}\n"
    )
    return config


def _run_train(tmp_path, *extra, check=True):
    config = write_tiny_config(tmp_path, "tiny", "solver: heun, nfe: 5, fit: adam, adam_steps: 5")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def test_train_py_end_to_end_writes_lambdas_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run_train(tmp_path, "--model.output", str(tmp_path / "out" / "l.safetensors"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RMSE to the exact probability-flow ODE endpoint" in result.stdout
    tensors, meta = load_lambdas(tmp_path / "out" / "l.safetensors", expect={"solver": "heun", "nfe": 5, "denoiser": "gmm_digits"})
    assert meta["target_mode"] == "aligned" and meta["scale"] == 2 and meta["batch_size"] == 20 and meta["fit"] == "adam"
    assert tensors["lambdas"].shape == (5,) and float(tensors["lambdas"][0]) == 0.0 and float(tensors["lambdas"][1:].abs().sum()) > 0
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert len(events.Scalars("lambda/stage_01")) == 5  # one point per fit step
    assert {"samples/teacher", "samples/base_student", "samples/d_student", "lambda_vs_sigma"} <= set(tags["images"])
    assert "loss/stage_04" in tags["scalars"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.solver", "rk99"], "unknown solver 'rk99'"),
        (["--model.fit", "lbfgs"], 'key "model.fit"'),
        (["--model.nfe", "abc"], 'key "model.nfe": Expected a <class \'int\'>. Got value: abc'),
        (["--nope", "1"], "unrecognized arguments: --nope 1; see python train.py --help"),
        (["--model.nfe", "4"], "NFE must be odd"),
        (["--data.scale", "1"], "scale C must be ≥ 2"),
        (["--data.batch_size", "0"], "batch sizes must be ≥ 1"),
        (["--model.denoiser", '{"source": "edm_pickle", "path": "nowhere.pkl"}'], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # as from the shell: pytest's own arguments are not ours
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {logger: false}\nmodel: {denoiser: {source: gmm_digits}, solver: heun, nfe: 5}\ndata: {batch_size: 4, cache_dir: null}\n")
    assert train_main(["--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_unwritable_output_fails_before_running_the_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {logger: false}\nmodel: {denoiser: {source: gmm_digits}, nfe: 5}\ndata: {batch_size: 4, cache_dir: " + json.dumps(str(tmp_path / "cache")) + "}\n")
    assert train_main(["--config", str(config), "--model.output", str(blocker / "sub" / "l.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the λ file" in err[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("layout", [[], ["--model.history", "3", "--model.lambda_groups", "blocks:2", "--model.guard", "0.25"]])
def test_pooled_fit_over_two_ranks_equals_the_union_batch(tmp_path, layout):
    """Also with m×m systems per group and the guard: its held-out seeds and checks are pooled the same way."""
    single = _run_train(tmp_path, "--model.fit", "closed_form", *layout, "--model.output", str(tmp_path / "one.safetensors"))
    assert single.returncode == 0, single.stderr[-2000:]
    double = _run_train(
        tmp_path, "--model.fit", "closed_form", *layout, "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--model.output", str(tmp_path / "two.safetensors"),
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, _ = load_lambdas(tmp_path / "one.safetensors")
    two, _ = load_lambdas(tmp_path / "two.safetensors")
    # With several directions the m×m systems are ill-conditioned (earlier Δ are nearly collinear): the two ranks'
    # summation order moves their solution by up to 1e-6 relative (measured 8e-7), one λ per stage by < 1e-9.
    if layout:
        torch.testing.assert_close(two["lambdas"], one["lambdas"], rtol=1e-5, atol=1e-5 * float(one["lambdas"].abs().max()))
    else:
        torch.testing.assert_close(two["lambdas"], one["lambdas"], rtol=1e-9, atol=1e-12)
