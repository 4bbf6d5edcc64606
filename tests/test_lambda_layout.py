"""More capacity per stage, still closed form (issue 12 item 3), and the never-worse guard (item 2)."""
import pytest
import torch

from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, holdout_mask, rmse, seeded_noise, teacher_targets
from dode_lightning.lambda_file import LambdaFileError, lambdas_to_apply, load_lambdas, save_lambdas
from dode_lightning.schedules import EDM
from dode_lightning.solvers import LambdaLayout, StageCorrector, make_solver, run_stages


@pytest.fixture(scope="module")
def problem(digits):
    setup = SolverSetup.resolve("euler", 5, EDM())
    student = setup.build()
    teacher, indices = build_teacher(student, setup, 4, "aligned", "heun")
    noise = seeded_noise(range(60), (1, 8, 8))[0]
    return student, noise, teacher_targets(teacher, indices, digits, noise)


def test_history_fit_is_the_least_squares_over_earlier_directions(digits, problem):
    """Each stage's λ minimise ‖x*_k − x̃_k − Σ_j λ_j Δ_{k−j}‖² over its directions (checked with lstsq)."""
    student, noise, targets = problem
    layout = LambdaLayout(history=3)
    fit = fit_closed_form(student, digits, noise, targets, layout=layout)
    assert fit.lambdas.shape == (5, 3, 1)
    checked = []

    def brute(k, stage):
        directions = corrector.directions(stage)
        system = torch.stack([d.flatten() for d in directions], 1)
        best = torch.linalg.lstsq(system, (targets[k] - stage.base).flatten().unsqueeze(1)).solution[:, 0]
        torch.testing.assert_close(fit.lambdas[k, : len(directions), 0], best, rtol=1e-6, atol=1e-9)
        checked.append(len(directions))
        return layout.expand(fit.lambdas, (1, 8, 8))[k]

    corrector = StageCorrector(brute, history=3)
    run_stages(student.stages(student.init_state(noise)), digits, corrector=corrector)
    assert checked == [1, 2, 3, 3]  # stage 0 has no Δ, so stage 1 has only its own and stage 2 one earlier
    assert bool((fit.loss_fit <= fit.loss_base + 1e-15).all())


def test_history_one_is_the_paper_fit(digits, problem):
    student, noise, targets = problem
    paper = fit_closed_form(student, digits, noise, targets)
    one = fit_closed_form(student, digits, noise, targets, layout=LambdaLayout(1, "blocks:1"))
    torch.testing.assert_close(one.lambdas[:, 0, 0], paper.lambdas, rtol=1e-10, atol=0)


def test_groups_fit_each_block_on_its_own(digits, problem):
    student, noise, targets = problem
    layout = LambdaLayout(1, "blocks:2")
    index = layout.group_index((1, 8, 8))
    assert index.shape == (1, 8, 8) and index[0, 0, 0] == 0 and index[0, 0, 7] == 1 and index[0, 7, 0] == 2 and index[0, 7, 7] == 3
    fit = fit_closed_form(student, digits, noise, targets, layout=layout)
    # Stage 1 starts from the same state in both fits (stage 0 is fixed), so its per-block λ is a 1-d fit per block.
    stage1 = {}
    run_stages(student.stages(student.init_state(noise)), digits, observe=lambda k, s, x: stage1.setdefault(k, s))
    stage = stage1[1]
    for g in range(4):
        mask = index == g
        delta, residual = stage.delta[:, mask], (targets[1] - stage.base)[:, mask]
        assert float(fit.lambdas[1, 0, g]) == pytest.approx(float((delta * residual).sum() / (delta * delta).sum()), rel=1e-9)
    assert LambdaLayout(2, "channel").shape(5, (3, 4, 4)) == (5, 2, 3)


def test_more_capacity_lowers_held_out_error(digits, problem):
    student, noise, targets = problem
    held = seeded_noise(range(1_000_000, 1_000_040), (1, 8, 8))[0]
    exact = digits.exact_endpoint(student.init_state(held), float(student.sigmas[0]))
    errors = {}
    for history in (1, 3):
        layout = LambdaLayout(history)
        fit = fit_closed_form(student, digits, noise, targets, layout=layout)
        errors[history] = rmse(student.sample(digits, held, layout.expand(fit.lambdas, (1, 8, 8))), exact)
    base = rmse(student.sample(digits, held), exact)
    assert errors[3] < 0.9 * errors[1] < 0.9 * base


def test_guard_drops_a_stage_whose_lambda_hurts_held_out_samples(digits, problem):
    student, noise, targets = problem
    held = holdout_mask(range(60), 0.25)
    assert int(held.sum()) == 15
    plain = fit_closed_form(student, digits, noise, targets, holdout=held)
    assert 2 not in plain.dropped
    # Mirror the held-out targets of stage 2 about the base state: a λ fitted on the others now hurts them.
    bad = targets.clone()
    stages = {}
    run_stages(student.stages(student.init_state(noise)), digits, lambda k, _s: plain.lambdas[k], lambda k, s, x: stages.setdefault(k, s))
    bad[2, held] = 2 * stages[2].base[held] - targets[2, held]
    guarded = fit_closed_form(student, digits, noise, bad, holdout=held)
    assert 2 in guarded.dropped and float(guarded.lambdas[2]) == 0.0
    assert float(guarded.held_fit[2]) >= float(guarded.held_base[2])
    assert float(guarded.lambdas[1]) == pytest.approx(float(plain.lambdas[1]))


def test_lambda_file_records_the_layout_and_refuses_a_mismatch(tmp_path):
    lambdas = torch.randn(5, 2, 4, dtype=torch.float64)
    path = save_lambdas(tmp_path / "l.safetensors", {"lambdas": lambdas, "sigmas": make_solver("euler", 5).sigmas}, {"solver": "euler", "history": 2, "lambda_groups": "blocks:2"})
    tensors, meta = load_lambdas(path)
    applied = lambdas_to_apply(path, tensors, meta, 5, (1, 8, 8))
    assert applied.shape == (5, 2, 1, 8, 8) and float(applied[3, 1, 0, 7, 7]) == float(lambdas[3, 1, 3])
    with pytest.raises(LambdaFileError, match="history 3"):
        lambdas_to_apply(path, tensors, {**meta, "history": 3}, 5, (1, 8, 8))
    with pytest.raises(LambdaFileError, match="for 5 stages, this solver has 9"):
        lambdas_to_apply(path, tensors, meta, 9, (1, 8, 8))
    with pytest.raises(ValueError, match="blocks:N"):
        LambdaLayout(1, "bands")


def test_default_teacher_is_unipc_3_for_more_than_one_direction():
    setup = SolverSetup.resolve("euler", 5, EDM())
    student = setup.build()
    assert build_teacher(student, setup, 4, "aligned")[0].name == "euler"
    assert build_teacher(student, setup, 4, "aligned", history=3)[0].name == "unipc_3"
    assert build_teacher(student, setup, 4, "paper", history=3)[0].name == "euler"


def test_guard_falls_back_to_the_base_solver_when_the_end_gets_worse(digits, problem):
    """Held-out final targets that agree with the base solver exactly: any λ makes their end worse."""
    student, noise, targets = problem
    held = holdout_mask(range(60), 0.25)
    bad = targets.clone()
    bad[-1, held] = student.sample(digits, noise[held])
    guarded = fit_closed_form(student, digits, noise, bad, holdout=held)
    assert guarded.dropped == [1, 2, 3, 4] and float(guarded.lambdas.abs().sum()) == 0.0
    assert float(fit_closed_form(student, digits, noise, targets, holdout=held).lambdas.abs().sum()) > 0
