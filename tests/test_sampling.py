"""sample.py: per-seed determinism across world sizes and batch sizes, resume after a kill, atomic output, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dode_lightning.checkpoints.edm_writer import write_edm_snapshot
from dode_lightning.checkpoints import load_denoiser
from dode_lightning.distill import SolverSetup, fit_closed_form, build_teacher, seeded_noise, teacher_targets
from dode_lightning.fid import exact_reference_images, load_detector, make_metric, metric_stats, save_reference
from dode_lightning.lambda_file import save_lambdas
from dode_lightning.lightning import ConfigError, build_student
from dode_lightning.networks import EDMPrecond
from dode_lightning.sample_cli import sample_main
from dode_lightning.sampling import GRID_FILE, FixedBatch, ImageStore, format_seeds, parse_seeds, sample_seeds, to_uint8
from tests.conftest import wait_for_pngs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_digits.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(outdir: Path, seeds: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sample.py"), "--config", str(CONFIG), "--lambdas", "none", "--seeds", seeds, "--outdir", str(outdir), *extra]


def _run(cwd: Path, outdir: Path, seeds: str, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(outdir, seeds, *extra), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _pngs(outdir: Path) -> dict[int, bytes]:
    files = sorted(p for p in outdir.rglob("*.png") if p.name != GRID_FILE)
    return {int(p.stem): p.read_bytes() for p in files}


def _shard_seeds(outdir: Path) -> list[int]:
    seeds: list[int] = []
    for shard in sorted((outdir / "npz").glob("*.npz")):
        with np.load(shard) as data:
            seeds += data["seeds"].tolist()
    return seeds


def test_parse_and_format_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7") == [7]
    assert parse_seeds("10-12, 3,11") == [3, 10, 11, 12]
    assert format_seeds(parse_seeds("0-4,7,9-10")) == "0-4,7,9-10"
    for bad in ("", "a-b", "5-3", "-1", "1--2", "0-", "1.5"):
        with pytest.raises(ConfigError, match="malformed seed range"):
            parse_seeds(bad)


def test_seeded_noise_of_no_seeds_is_empty_with_the_right_shape():
    """The joint fit draws its hard seeds outside the batch, which may be none."""
    noise, labels = seeded_noise([], (3, 4, 4), label_dim=10)
    assert noise.shape == (0, 3, 4, 4) and labels.shape == (0, 10) and noise.dtype == labels.dtype == torch.float64


def test_to_uint8_is_edm_rounding():
    x = torch.tensor([-1.0, -1.5, 1.0, 2.0, 0.0, (0.5 - 128) / 127.5, (1.4999 - 128) / 127.5], dtype=torch.float64)
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 128, 0, 1]


@pytest.mark.parametrize("label_dim", [0, 4])
def test_tiny_edm_network_is_per_seed_at_a_fixed_eval_batch(tmp_path, label_dim):
    """An EDM network: labels come from each seed's generator after its latents; through `FixedBatch` batches of 3 and 8
    seeds give bit-identical states, while calling the network on the predict batch itself does not."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    write_edm_snapshot(tmp_path / "net.pkl", net)
    loaded = load_denoiser("edm_pickle", tmp_path / "net.pkl")
    student = SolverSetup.resolve("heun", 5, loaded.schedule).build()
    seeds = list(range(5, 21))

    def run(denoiser, batch):
        parts = [sample_seeds(student, denoiser, seeds[i : i + batch], loaded.image_shape, label_dim) for i in range(0, len(seeds), batch)]
        return torch.cat([x for x, _ in parts]), None if not label_dim else torch.cat([lab for _, lab in parts])

    fixed = FixedBatch(loaded.denoiser, 4)
    (x3, lab3), (x8, lab8) = run(fixed, 3), run(fixed, 8)
    assert torch.equal(x3, x8)
    raw3, raw8 = run(loaded.denoiser, 3)[0], run(loaded.denoiser, 8)[0]
    assert not torch.equal(raw3, raw8)  # the problem FixedBatch solves (if this starts to hold, the test lost its teeth)
    torch.testing.assert_close(raw3, x3, rtol=1e-3, atol=1e-3)
    if label_dim:
        assert torch.equal(lab3, lab8) and torch.equal(lab3, seeded_noise(seeds, loaded.image_shape, label_dim)[1])
        assert len(set(lab3.argmax(-1).tolist())) > 1


def test_one_vs_two_ddp_processes_and_batch_sizes(tmp_path):
    """Bit-identical PNGs (and npz shards) for 1 process/batch 3 and 2 gloo DDP processes/batch 8; one image per seed;
    the FID computed from states summed across the two ranks equals the single-process value."""
    seeds = "0-20"  # 21 seeds: ranks get 11 and 10
    # An npz reference is loaded on rank 0 only; loaded on both ranks it would count twice and change Σ and the FID.
    reference = exact_reference_images(60, class_conditional=False)  # small n: counting it twice shifts the FID by ~1%
    save_reference(tmp_path / "ref.npz", *metric_stats(_filled(reference)), detector=load_detector("pixels", (1, 8, 8)))
    fid = ("--fid-ref", str(tmp_path / "ref.npz"))
    common = ("--eval-batch", "4", "--format", "both", *fid)
    _run(tmp_path, tmp_path / "one", seeds, "--batch-size", "3", *common)
    _run(tmp_path, tmp_path / "two", seeds, "--batch-size", "8", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(21))
    assert all(one[s] == two[s] for s in one)
    # rank 0 draws the grid from both ranks' images
    assert (tmp_path / "one" / GRID_FILE).read_bytes() == (tmp_path / "two" / GRID_FILE).read_bytes()
    for name in ("one", "two"):
        shard_seeds = _shard_seeds(tmp_path / name)
        assert sorted(shard_seeds) == list(range(21))  # no duplicates, none missing
    store_one, store_two = ImageStore(tmp_path / "one", "npz"), ImageStore(tmp_path / "two", "npz")
    png_store = ImageStore(tmp_path / "one", "png")
    for store in (store_one, store_two, png_store):
        store.scan(range(21), (1, 8, 8))
    png = png_store.collect(range(21))
    assert np.array_equal(store_one.collect(range(21)), png) and np.array_equal(store_two.collect(range(21)), png)
    fid_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    fid_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert fid_one["num_generated"] == fid_two["num_generated"] == 21
    # 21 samples < 64 features: Σ_fake is singular and √eig amplifies the 1e-16 of a different summation order.
    assert fid_two["value"] == pytest.approx(fid_one["value"], rel=1e-6) and fid_one["value"] > 0
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["seeds"] == "0-20" and manifest["identity"]["solver"] == "heun" and manifest["lambda_file"] is None


def _filled(images: torch.Tensor):
    metric = make_metric(load_detector("pixels", (1, 8, 8)))
    metric.update(images, real=True)
    return metric


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    seeds = "0-199"
    fid = ("--fid-ref", "exact", "--fid-ref-count", "300")
    outdir = tmp_path / "resumed"
    process = subprocess.Popen(_command(outdir, seeds, "--batch-size", "2"), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_pngs(process, outdir, 6)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = _pngs(outdir)
    assert 6 <= len(partial) < 200
    stale = outdir / "000000" / ".000199.png.abc.tmp"  # what a kill during a write leaves behind
    stale.write_bytes(b"\x89PNG half")
    _run(tmp_path, outdir, seeds, "--batch-size", "7", *fid)
    monkeypatch.chdir(tmp_path)
    assert sample_main(_command(tmp_path / "straight", seeds, "--batch-size", "16", *fid)[2:]) == 0
    resumed, straight = _pngs(outdir), _pngs(tmp_path / "straight")
    assert sorted(resumed) == list(range(200)) and resumed == straight
    assert all(resumed[s] == data for s, data in partial.items())  # written once, never rewritten differently
    assert not [p for p in outdir.rglob("*") if p.name.startswith(".") and p.name != ".sampling.lock"]
    for path in outdir.rglob("*.png"):
        with Image.open(path) as image:
            image.load()
    # FID after resuming covers all 200 seeds (the first ones read back from disk) and equals the straight run's.
    resumed_fid = json.loads((outdir / "metrics.json").read_text())
    straight_fid = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed_fid["num_generated"] == 200
    assert resumed_fid["value"] == pytest.approx(straight_fid["value"], rel=1e-12)


def test_rerun_skips_written_seeds_and_extends_the_range(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _command(tmp_path / "out", "0-9", "--format", "npz")[2:]
    assert sample_main(args) == 0
    first = sorted((tmp_path / "out" / "npz").glob("*.npz"))
    mtimes = [p.stat().st_mtime_ns for p in first]
    assert sample_main(args) == 0
    assert "0 generated" in capsys.readouterr().out
    assert sorted((tmp_path / "out" / "npz").glob("*.npz")) == first and [p.stat().st_mtime_ns for p in first] == mtimes
    assert sample_main(_command(tmp_path / "out", "5-14", "--format", "npz")[2:]) == 0
    assert sorted(_shard_seeds(tmp_path / "out")) == list(range(15))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seeds"] == "0-14"


def _lambda_file(path: Path, nfe: int) -> Path:
    built = build_student({"source": "gmm_digits"}, "heun", nfe)
    setup, student, mixture = built.setup, built.solver, built.loaded.denoiser
    teacher, indices = build_teacher(student, setup, 4, "aligned")
    noise, _ = seeded_noise(range(20), built.loaded.image_shape)
    fit = fit_closed_form(student, mixture, noise, teacher_targets(teacher, indices, mixture, noise))
    return save_lambdas(path, {"lambdas": fit.lambdas, "sigmas": student.sigmas}, {**built.metadata(), "class_conditional": False})


def test_lambda_file_changes_the_samples_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lam = _lambda_file(tmp_path / "lam.safetensors", 9)
    base = _command(tmp_path / "base", "0-3")[2:]
    d_args = list(base)
    d_args[d_args.index("--lambdas") + 1] = str(lam)
    d_args[d_args.index("--outdir") + 1] = str(tmp_path / "d")
    assert sample_main(base) == 0 and sample_main(d_args) == 0
    assert _pngs(tmp_path / "base") != _pngs(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["lambda_file"]["metadata"]["nfe"] == 9 and len(manifest["lambda_file"]["sha256"]) == 64
    # The same folder refuses a different configuration (base solver into the D-solver's folder).
    base[base.index("--outdir") + 1] = str(tmp_path / "d")
    assert sample_main(base) == 2


def test_sampler_takes_everything_from_one_read_of_the_lambda_file(tmp_path, monkeypatch):
    """A λ file replaced while the sampler loads the denoiser (train.py rewriting the same path) does not mix two
    fits: σ, λ and the recorded hash are the first file's."""
    import hashlib

    from dode_lightning import sampling

    first = _lambda_file(tmp_path / "lam.safetensors", 9)
    first_bytes = first.read_bytes()
    _lambda_file(tmp_path / "other.safetensors", 5)
    build = sampling.build_student

    def build_then_replace(*args, **kwargs):
        built = build(*args, **kwargs)
        os.replace(tmp_path / "other.safetensors", first)
        return built

    monkeypatch.setattr(sampling, "build_student", build_then_replace)
    sampler = sampling.DODESampler(lambdas=str(first))
    assert first.read_bytes() != first_bytes
    assert sampler.lambda_file["sha256"] == hashlib.sha256(first_bytes).hexdigest()
    assert sampler.lambda_file["metadata"]["nfe"] == 9 and sampler.student.nfe == 9 and len(sampler.lambdas) == sampler.student.num_stages


def test_sample_py_refuses_a_lambda_file_that_changes_while_it_starts(tmp_path, monkeypatch, capsys):
    """The settings sample.py checks against the command line and the sampler's own read are of one file."""
    from dode_lightning import sample_cli

    monkeypatch.chdir(tmp_path)
    lam = _lambda_file(tmp_path / "lam.safetensors", 9)
    _lambda_file(tmp_path / "other.safetensors", 5)
    checked = sample_cli.check_writable

    def check_then_replace(outdir):  # runs between the settings check and the sampler's read
        checked(outdir)
        os.replace(tmp_path / "other.safetensors", lam)

    monkeypatch.setattr(sample_cli, "check_writable", check_then_replace)
    args = _command(tmp_path / "d", "0-3")[2:]
    args[args.index("--lambdas") + 1] = str(lam)
    assert sample_main(args) == 2
    assert "changed while sample.py started" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.png"))


def _bad_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["seeds", "outdir_under_file", "lambda_other_nfe", "fid_without_reference", "npz_keys", "npz_shape", "lambda_missing", "fewer_seeds_than_processes"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    outdir = tmp_path / "out"
    args = _command(outdir, "0-3")[2:]

    def put(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    if case == "seeds":
        put("--seeds", "10-2")
    elif case == "outdir_under_file":
        (tmp_path / "file").write_text("x")
        outdir = tmp_path / "file" / "out"
        put("--outdir", str(outdir))
    elif case == "lambda_other_nfe":
        put("--lambdas", str(_lambda_file(tmp_path / "lam.safetensors", 5)))
        args += ["--model.nfe", "9"]  # the λ file's NFE is used; repeating another one on the command line is refused
    elif case == "lambda_missing":
        put("--lambdas", str(tmp_path / "nope.safetensors"))
    elif case == "fid_without_reference":
        args.append("--fid")
    elif case == "fewer_seeds_than_processes":
        put("--seeds", "0")
        args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    elif case == "npz_keys":
        args += ["--fid-ref", _bad_npz(tmp_path / "ref.npz", mean=np.zeros(64), cov=np.eye(64))]
    elif case == "npz_shape":
        args += ["--fid-ref", _bad_npz(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))]
    assert sample_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {
        "seeds": "malformed seed range",
        "outdir_under_file": "not a directory",
        "lambda_other_nfe": "--model.nfe 9 conflicts with the λ file, fitted with nfe 5",
        "lambda_missing": "does not exist",
        "fid_without_reference": "--fid needs reference statistics",
        "npz_keys": "lacks ['mu', 'sigma']",
        "npz_shape": "this detector needs (64,)",
        "fewer_seeds_than_processes": "at least one seed per process",
    }[case]
    assert expected in err[0]
    assert not outdir.exists()
