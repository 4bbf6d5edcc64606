"""UniPC through every path with no solver-specific code outside solvers/unipc.py (issue 12 item 4): teacher, D-variant
with the layouts and the guard, both fits, the λ file and sample.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dode_lightning.distill import SolverSetup, build_teacher, fit_closed_form, rmse, seeded_noise, teacher_targets
from dode_lightning.lambda_file import load_lambdas
from dode_lightning.schedules import EDM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,gain", [("unipc_2", 1.02), ("unipc_3", 0.8)])
def test_d_unipc_beats_unipc_and_unipc_teaches(digits, name, gain):
    """Measured at NFE 5 (Karras + 0): D-UniPC-3 0.375 → 0.176; D-UniPC-2 0.161 → 0.159 only (one λ per stage)."""
    setup = SolverSetup.resolve(name, 5, EDM())
    student = setup.build()
    noise = seeded_noise(range(40), (1, 8, 8))[0]
    held = seeded_noise(range(1_000_000, 1_000_040), (1, 8, 8))[0]
    exact = digits.exact_endpoint(student.init_state(held), float(student.sigmas[0]))
    teacher, indices = build_teacher(student, setup, 4, "aligned", name)
    targets = teacher_targets(teacher, indices, digits, noise)
    assert rmse(teacher.sample(digits, held), exact) < 0.5 * rmse(student.sample(digits, held), exact)
    fit = fit_closed_form(student, digits, noise, targets)
    assert float(fit.lambdas[0]) == 0.0 and not fit.misaligned()
    assert rmse(student.sample(digits, held, fit.lambdas), exact) < gain * rmse(student.sample(digits, held), exact)


def test_train_and_sample_d_unipc_with_history_groups_and_guard(tmp_path):
    config = tmp_path / "unipc.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false, logger: false}\n"
        "model: {denoiser: {source: gmm_digits}, solver: unipc_3, nfe: 5, fit: compare, adam_steps: 3, history: 3, lambda_groups: 'blocks:2', guard: 0.2}\n"
        "data: {scale: 3, batch_size: 20, teacher: unipc_3, class_conditional: false, cache_dir: null}\n"
    )
    output = tmp_path / "l.safetensors"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    train = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--model.output", str(output), "--exact_report", "false"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert "closed form vs Adam" in train.stdout and "(+11 more)" in train.stdout
    tensors, meta = load_lambdas(output, expect={"solver": "unipc_3", "nfe": 5})
    assert tensors["lambdas"].shape == (6, 3, 4) and meta["history"] == 3 and meta["lambda_groups"] == "blocks:2"
    assert meta["teacher"] == "unipc_3" and meta["guard"] == 0.2 and isinstance(meta["dropped_stages"], list)
    outs = {}
    for tag, lam in (("base", "none"), ("d", str(output))):
        outs[tag] = tmp_path / tag
        result = subprocess.run(
            [sys.executable, str(ROOT / "sample.py"), "--config", str(config), "--lambdas", lam, "--seeds", "0-3",
             "--outdir", str(outs[tag]), "--format", "npz"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((outs["d"] / "manifest.json").read_text())
    assert manifest["lambda_file"]["metadata"]["history"] == 3
    assert sorted(p.read_bytes() for p in (outs["base"] / "npz").glob("*.npz")) != sorted(
        p.read_bytes() for p in (outs["d"] / "npz").glob("*.npz")
    )
