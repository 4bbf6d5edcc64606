"""Smoke runs of the benchmark scripts' --quick modes (about 2 minutes together; not part of CI)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import write_section

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("quality", [], "quality", ["quality_rmse.png", "quality_fd.png"]),
    ("quality", ["--peers"], "quality_peers", ["quality_peers.png"]),
    ("quality", ["--fitted-grid"], "quality_fitted_grid", []),
    ("cost", [], "cost", []),
    ("overhead", [], "overhead", []),
    ("scheduler_cost", [], "scheduler_cost", []),
    ("trajectories", [], "trajectories", ["fig2_cosine.png", "fig5_trajectory.png"]),
    ("learned", [], "learned", ["learned_rmse.png"]),
    ("scheduler_runs", [], "scheduler_runs", []),
    ("flow", [], "flow", []),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,section_name,figures", CASES)
def test_quick_mode_prints_a_table_and_writes_its_section(tmp_path, script, extra, section_name, figures):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", *extra, "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "|---|" in result.stdout
    section = (tmp_path / "benchmarks.md").read_text()
    assert f"<!-- begin {section_name} -->" in section and f"<!-- end {section_name} -->" in section
    assert "--quick" in section
    for name in figures:
        assert (tmp_path / "benchmarks" / name).stat().st_size > 10_000


@pytest.mark.slow
def test_learned_steps_quick_writes_its_page(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "learned_steps.py"), "--quick", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "learned_steps.md").read_text()
    assert "--quick" in page and "| joint σ + D h-all |" in page and "package best / best peer" in page


def test_sections_are_replaced_in_place(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nhand-written intro\n")
    write_section(tmp_path, "a", "first")
    write_section(tmp_path, "b", "other")
    write_section(tmp_path, "a", "second")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "hand-written intro" in text and "second" in text and "first" not in text
    assert text.index("<!-- begin a -->") < text.index("<!-- begin b -->")


@pytest.mark.slow
def test_best_configs_quick_scores_a_shipped_config_on_the_large_set(tmp_path):
    """`--config` of a shipped config writes its own page; `--large` adds the large-set RMSE with the wrong-mode
    count, the GITS and LD3 reproductions there, and the ratio to the better of them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "best_configs.py"), "--quick", "--nfe", "5", "--large", "40",
               "--config", "configs/gmm_digits_budget.yaml", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "best_configs_gmm_digits_budget.md").read_text()
    assert "--config configs/gmm_digits_budget.yaml --large 40" in page and "RMSE on 40 seeds from 3,000,000" in page
    row = next(line for line in page.splitlines() if line.startswith("| 5 |")).split(" | ")
    assert row[8].startswith("GITS 0.") and ", LD3 0." in row[8] and row[9].endswith("×")


@pytest.mark.slow
def test_wrong_mode_follows_the_lost_seeds_along_the_student(tmp_path):
    """benchmarks/wrong_mode.py: a table row per stage of the student, and the one-step check for the network's and
    the stored x̂₀."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "wrong_mode.py"), "--quick", "--nfe", "5", "--seeds", "300", "--first-step-seeds", "100",
               "--config", "configs/gmm_digits_budget.yaml", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "wrong_mode_nfe5.md").read_text()
    assert "--config configs/gmm_digits_budget.yaml --nfe 5 --seeds 300 --first-step-seeds 100" in page
    stage_rows = [line for line in page.splitlines() if line.startswith("| ") and " of " in line.split(" | ")[-1] and "→" not in line]
    assert len(stage_rows) == 6  # first_step mean: NFE 5 network calls drive 6 stages
    assert "the stored batch-mean x̂₀ (first_step mean) | " in page and "the network's x̂₀ | " in page


@pytest.mark.slow
def test_family_floor_refits_the_config_against_the_exact_ode(tmp_path):
    """benchmarks/family_floor.py: the config's student and its refit on the exact ODE, scored alike; the refit
    keeps its best iterate, so its training loss never ends above where it started."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "benchmarks" / "family_floor.py"), "--quick", "--nfe", "5", "--calibration-seeds", "50", "--iterations", "3",
               "--seeds", "300", "--config", "configs/gmm_digits_budget.yaml", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "family_floor_nfe5.md").read_text()
    assert "--config configs/gmm_digits_budget.yaml --nfe 5 --calibration-seeds 50 --iterations 3 --seeds 300" in page
    start, end = (float(value) for value in page.split("training loss ")[1].split(" in ")[0].split(" → "))
    assert end <= start
    rows = [line for line in page.splitlines() if line.startswith("| `configs/") or line.startswith("| its σ and λ refitted")]
    assert len(rows) == 2 and all(float(line.split(" | ")[1]) > 0 for line in rows)
