"""Step placement on the teacher's trajectory (issue 18 item 2, `grid: teacher_dp`)."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dode_lightning.cli import train_main
from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, rmse, seeded_noise, teacher_targets
from dode_lightning.grids import make_sigmas
from dode_lightning.lambda_file import load_lambdas
from dode_lightning.placement import one_step_costs, place_knots, placed_sigmas, placement_teacher, states_at, teacher_trajectory
from dode_lightning.sampling import DODESampler
from dode_lightning.schedules import EDM
from dode_lightning.solvers import LambdaLayout, make_solver


def _brute_force(costs: torch.Tensor, steps: int, coefficient: float) -> float:
    points = len(costs)
    best = float("inf")
    for inner in itertools.combinations(range(1, points - 1), steps - 1):
        knots = (0, *inner, points - 1)
        best = min(best, sum(coefficient**n * float(costs[a, b]) for n, (a, b) in enumerate(zip(knots, knots[1:]))))
    return best


@pytest.mark.parametrize("coefficient", [1.0, 1.15])
def test_dp_is_optimal_on_small_cost_matrices(coefficient):
    generator = torch.Generator().manual_seed(0)
    for points, steps in [(6, 2), (8, 3), (9, 5), (7, 6)]:
        costs = torch.rand(points, points, generator=generator, dtype=torch.float64).triu(1)
        costs[torch.ones(points, points, dtype=torch.bool).tril()] = float("inf")
        knots = place_knots(costs, steps, coefficient)
        assert knots[0] == 0 and knots[-1] == points - 1 and len(knots) == steps + 1 and knots == sorted(set(knots))
        found = sum(coefficient**n * float(costs[a, b]) for n, (a, b) in enumerate(zip(knots, knots[1:])))
        assert found == pytest.approx(_brute_force(costs, steps, coefficient), rel=1e-12)
    # A hand-made case: jumping 0 → 2 is cheap, 2 → 4 too; every other route costs more.
    costs = torch.full((5, 5), 10.0, dtype=torch.float64)
    costs[0, 2], costs[2, 4] = 1.0, 1.0
    assert place_knots(costs, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="cannot place 5 steps"):
        place_knots(costs, 5)


@pytest.fixture(scope="module")
def calibration(digits):
    schedule = EDM()
    noise, _ = seeded_noise(range(100), (1, 8, 8))
    student = make_solver("ipndm", 5, schedule, terminal_zero=False)
    setup = SolverSetup.resolve("ipndm", 5, schedule, terminal_zero=False)
    trajectory = teacher_trajectory(placement_teacher(student, setup, 100), digits, noise)
    return schedule, noise, setup, trajectory


def test_placed_grid_descends_between_the_fixed_ends(calibration):
    schedule, noise, setup, trajectory = calibration
    assert trajectory.evaluations == 100 and trajectory.states.shape == (101, 100, 1, 8, 8)
    costs = one_step_costs(trajectory)
    upper = torch.ones(101, 101, dtype=torch.bool).triu(1)
    assert torch.isinf(costs[~upper]).all() and bool((costs[upper] >= 0).all()) and bool(costs[upper].isfinite().all())
    # iPNDM's first step is DDIM itself (cost 0); later ones from neighbour to neighbour are far cheaper than jumps.
    assert float(costs[0, 1]) == pytest.approx(0.0, abs=1e-12) and float(costs[40, 41]) < float(costs[40, 70]) / 10
    fine = make_sigmas("karras", 100, schedule, terminal_zero=False)
    for steps in (3, 5, 8):
        sigmas = placed_sigmas(trajectory, steps)
        assert len(sigmas) == steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all())
        assert float(sigmas[0]) == float(fine[0]) and float(sigmas[-1]) == float(fine[-1])
        assert all(float(s) in set(fine.tolist()) for s in sigmas)


def test_costs_of_several_runs_are_those_of_one_run_over_all_their_seeds(calibration, digits):
    """`one_step_costs` over runs of 30 + 70 seeds (dp_seeds: the batch, then the seeds after it) equals one run's."""
    schedule, noise, setup, trajectory = calibration
    teacher = placement_teacher(make_solver("ipndm", 5, schedule, terminal_zero=False), setup, 100)
    runs = (teacher_trajectory(teacher, digits, part) for part in (noise[:30], noise[30:]))
    assert torch.allclose(one_step_costs(runs), one_step_costs(trajectory), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="at least one teacher run"):
        one_step_costs([])


def test_dp_grid_beats_the_karras_grid_on_held_out_seeds(calibration, digits):
    schedule, noise, setup, trajectory = calibration
    held, _ = seeded_noise(range(1_000_000, 1_000_100), (1, 8, 8))
    exact = digits.exact_endpoint(held * 80.0, 80.0, sigma_end=0.002)
    layout = LambdaLayout(5)  # history all
    errors = {}
    for name in ("karras", "teacher_dp"):
        if name == "karras":
            student = make_solver("ipndm", 5, schedule, terminal_zero=False)
            teacher, indices = build_teacher(student, setup, 10, "aligned", "unipc_3")
            targets = teacher_targets(teacher, indices, digits, noise)
        else:
            student = make_solver("ipndm", 5, schedule, sigmas=placed_sigmas(trajectory, 5))
            targets = states_at(trajectory, student.target_sigmas)  # the same run: no further evaluation
        fit = fit_closed_form(student, digits, noise, targets, layout=layout)
        errors[name] = (rmse(student.sample(digits, held), exact), rmse(student.sample(digits, held, layout.expand(fit.lambdas, (1, 8, 8))), exact))
    assert errors["teacher_dp"][0] < 0.92 * errors["karras"][0]  # measured 0.116 vs 0.134 (base iPNDM)
    assert errors["teacher_dp"][1] < 0.8 * errors["karras"][1]  # measured 0.066 vs 0.089 (D h-all)


def test_train_py_teacher_dp_writes_the_placed_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false}\n"
        "model: {denoiser: {source: gmm_digits}, solver: ipndm, nfe: 4, grid: teacher_dp, dp_steps: 40, terminal_zero: false, history: 4}\n"
        f"data: {{batch_size: 12, cache_dir: {str(tmp_path / 'cache')!r}}}\n"
    )
    out = tmp_path / "l.safetensors"
    args = ["--config", str(config), "--model.output", str(out), "--exact_report", "false"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher_dp, M = 40" in printed and "teacher 480 (40 × 12 rows)" in printed
    tensors, meta = load_lambdas(out)
    assert meta["grid"] == "teacher_dp" and meta["teacher"] == "ipndm" and meta["teacher_nfe"] == 40
    assert meta["grid_kwargs"]["dp_steps"] == 40 and meta["grid_kwargs"]["dp_grid"] == "karras"
    fine = make_sigmas("karras", 40, EDM(), terminal_zero=False)
    sigmas = tensors["sigmas"]
    assert len(sigmas) == 5 and set(sigmas.tolist()) <= set(fine.tolist()) and not torch.equal(sigmas, make_solver("ipndm", 4, terminal_zero=False).sigmas)
    assert torch.equal(DODESampler(lambdas=str(out)).student.sigmas, sigmas)
    assert train_main([*args, "--model.output", str(tmp_path / "again.safetensors")]) == 0  # from the cache
    assert "cached" in capsys.readouterr().out
    again, _ = load_lambdas(tmp_path / "again.safetensors")
    assert torch.equal(again["sigmas"], sigmas) and torch.equal(again["lambdas"], tensors["lambdas"])
    assert train_main([*args, "--model.dp_steps", "1"]) == 2
    assert "teacher_dp needs 2 ≤ dp_steps" in capsys.readouterr().err
    assert train_main([*args, "--data.teacher", "heun"]) == 2
    assert "evaluate once per step" in capsys.readouterr().err


def test_train_py_dp_seeds_places_on_the_batch_and_the_seeds_after_it(tmp_path, monkeypatch, capsys, digits):
    """`dp_seeds: 40` with a batch of 8: the placement's one-step errors are averaged over seeds 0 … 39, the λ
    targets still come from the batch's own run; the setting is recorded and a count below the batch is refused."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false}\n"
        "model: {denoiser: {source: gmm_digits}, solver: ipndm, nfe: 4, grid: teacher_dp, dp_steps: 40, dp_seeds: 40, terminal_zero: false, history: 4}\n"
        "data: {batch_size: 8, class_conditional: false, cache_dir: null}\n"
    )
    out = tmp_path / "l.safetensors"
    args = ["--config", str(config), "--model.output", str(out), "--exact_report", "false"]
    assert train_main(args) == 0
    assert "placement teacher on the dp_seeds after the batch 1280, " in capsys.readouterr().out  # 32 seeds × NFE 40
    tensors, meta = load_lambdas(out)
    assert meta["grid_kwargs"]["dp_seeds"] == 40
    student = make_solver("ipndm", 4, EDM(), terminal_zero=False)
    setup = SolverSetup.resolve("ipndm", 4, EDM(), terminal_zero=False)
    teacher = placement_teacher(student, setup, 40)
    pooled = placed_sigmas(teacher_trajectory(teacher, digits, seeded_noise(range(40), (1, 8, 8))[0]), 4)
    batch_only = placed_sigmas(teacher_trajectory(teacher, digits, seeded_noise(range(8), (1, 8, 8))[0]), 4)
    assert torch.equal(tensors["sigmas"], pooled) and not torch.equal(pooled, batch_only)
    assert train_main([*args, "--model.dp_seeds", "5"]) == 2
    assert "dp_seeds counts the seeds the placement measures from data.seed" in capsys.readouterr().err


@pytest.mark.slow
def test_dp_seeds_over_two_ranks_places_like_one_process(tmp_path):
    """Under DDP the ranks split the seeds after the batch and pool their one-step errors: the same σ as one process."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false, accelerator: cpu}\n"
        "model: {denoiser: {source: gmm_digits}, solver: ipndm, nfe: 4, grid: teacher_dp, dp_steps: 40, dp_seeds: 40, terminal_zero: false, history: 4}\n"
        "data: {batch_size: 8, class_conditional: false, cache_dir: null}\n"
    )
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--config", str(config), "--exact_report", "false"]
    runs = {}
    for name, extra in (("one", []), ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        result = subprocess.run([*command, "--model.output", str(tmp_path / f"{name}.safetensors"), *extra], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_lambdas(tmp_path / f"{name}.safetensors")[0]["sigmas"]
    assert torch.equal(runs["two"], runs["one"])
