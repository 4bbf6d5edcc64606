"""Issue 13: bad inputs and hostile or damaged files end in one `error:` line (exit 2) with nothing created or lost;
sampling deletes only its own temporaries, verifies what it resumes from, and stops cleanly on SIGTERM or a full disk."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dode_lightning.lightning as lightning
import dode_lightning.sampling as sampling
from dode_lightning.atomic import atomic_write_bytes
from dode_lightning.cli import train_main
from dode_lightning.distill import seeded_noise
from dode_lightning.lambda_file import LambdaFileError, load_lambdas, save_lambdas
from dode_lightning.lightning import ConfigError, build_student
from dode_lightning.sample_cli import sample_main
from dode_lightning.sampling import GRID_FILE, ImageStore, parse_seeds
from dode_lightning.solvers import make_solver
from tests.conftest import wait_for_pngs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_digits.yaml"


def _args(outdir: Path, seeds: str = "0-3", *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--lambdas", "none", "--seeds", seeds, "--outdir", str(outdir), *extra]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → content); directories as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _pngs(outdir: Path) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in sorted(outdir.rglob("*.png")) if p.name != GRID_FILE}


def _one_error_line(capsys) -> str:
    """The run's one `error:` line, last on stderr (library warnings are printed when pytest does not catch them)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sampling logger writes runs/ into the working directory
    return tmp_path


# --- 1: only this package's own temporaries are removed --------------------------------------------------------------

def test_resume_removes_only_its_own_temporaries(in_tmp):
    outdir = in_tmp / "out"
    foreign = {
        outdir / ".download.part.tmp": b"a",
        outdir / "sub" / ".editor.tmp": b"b",
        outdir / "000000" / ".notes.tmp": b"c",
        outdir / "npz" / ".seeds-000000-n4.npz.keep.me": b"d",
        outdir / "000000" / ".000001.txt.abc.tmp": b"e",
    }
    ours = [outdir / "000000" / ".000003.png.k2j4h5g6.tmp", outdir / ".manifest.json.a_b1c2d3.tmp", outdir / "npz" / ".seeds-000000-n4.npz.zz99yy88.tmp"]
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for path in ours:
        path.write_bytes(b"half a file")
    assert sample_main(_args(outdir, "0-3", "--format", "both")) == 0
    assert all(path.read_bytes() == data for path, data in foreign.items())
    assert not any(path.exists() for path in ours)
    assert sorted(_pngs(outdir)) == [0, 1, 2, 3]


# --- 10: seeds ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec,message",
    [
        ("0-999999999999", "too large"),
        ("4294967296", "too large"),
        ("0,4294967296", "too large"),
        ("18446744073709551616", "too large"),
        ("9" * 30, "malformed seed range"),
        ("0-20000000", "asks for 20000001 seeds"),
    ],
)
def test_seeds_that_cannot_be_honoured_are_refused(in_tmp, capsys, spec, message):
    started = time.perf_counter()
    assert sample_main(_args(in_tmp / "out", spec)) == 2
    assert message in _one_error_line(capsys)
    assert time.perf_counter() - started < 30  # refused before building any list of seeds
    assert not (in_tmp / "out").exists()


def test_a_folder_with_more_seeds_than_one_run_takes_still_resumes(in_tmp):
    outdir = in_tmp / "out"
    assert sample_main(_args(outdir, "0-3")) == 0
    manifest = json.loads((outdir / "manifest.json").read_text())
    manifest["seeds"] = "0-3,100000000-119999999"  # what earlier runs of 10^7 seeds each recorded
    (outdir / "manifest.json").write_text(json.dumps(manifest))
    assert sample_main(_args(outdir, "4-5")) == 0
    assert json.loads((outdir / "manifest.json").read_text())["seeds"] == "0-5,100000000-119999999"


def test_largest_seed_is_distinct_and_overlapping_ranges_merge():
    assert parse_seeds("5-9,0-6,3") == list(range(10))
    assert parse_seeds("4294967295") == [4294967295]
    low, _ = seeded_noise([0], (1, 8, 8))
    high, _ = seeded_noise([4294967295], (1, 8, 8))
    assert not np.array_equal(low.numpy(), high.numpy())
    with pytest.raises(ValueError, match="32-bit"):
        seeded_noise([1 << 32], (1, 8, 8))  # would repeat seed 0 if it were reduced mod 2^32
    with pytest.raises(ConfigError, match="at most 10"):
        parse_seeds("0-10", limit=10)


# --- 13: unexpected things in the output folder -------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["png_folder_is_file", "npz_is_file", "manifest_is_dir", "manifest_is_list", "manifest_without_identity", "manifest_bad_seeds", "manifest_deep"])
def test_unexpected_outdir_content_is_one_line_and_changes_nothing(in_tmp, capsys, case):
    outdir = in_tmp / "out"
    outdir.mkdir()
    extra: tuple[str, ...] = ()
    manifest = outdir / "manifest.json"
    if case == "png_folder_is_file":
        (outdir / "000000").write_text("x")
        message = "is not a folder"
    elif case == "npz_is_file":
        (outdir / "npz").write_text("x")
        extra, message = ("--format", "npz"), "is not a folder"
    elif case == "manifest_is_dir":
        manifest.mkdir()
        message = "is not a file"
    elif case == "manifest_deep":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
        message = "is unreadable"
    else:
        content = {
            "manifest_is_list": [],
            "manifest_without_identity": {"format": sampling.MANIFEST_FORMAT, "seeds": "0-3"},
            "manifest_bad_seeds": {"format": sampling.MANIFEST_FORMAT, "identity": {}, "seeds": "0-99999999999"},
        }[case]
        manifest.write_text(json.dumps(content))
        message = "not a dode-lightning sample manifest"
    before = _files(outdir)
    assert sample_main(_args(outdir, "0-3", *extra)) == 2
    assert message in _one_error_line(capsys)
    assert _files(outdir) == before


# --- 20: resume verifies what is on disk --------------------------------------------------------------------------------

def test_resume_regenerates_broken_pngs(in_tmp, capsys):
    outdir = in_tmp / "out"
    assert sample_main(_args(outdir, "0-5")) == 0
    good = _pngs(outdir)
    (outdir / "000000" / "000002.png").write_bytes(b"")
    (outdir / "000000" / "000004.png").write_bytes(good[4][: len(good[4]) // 2])
    capsys.readouterr()
    assert sample_main(_args(outdir, "0-5", "--fid-ref", "exact", "--fid-ref-count", "50")) == 0
    assert "2 generated" in capsys.readouterr().out
    assert _pngs(outdir) == good
    assert json.loads((outdir / "metrics.json").read_text())["num_generated"] == 6


def test_resume_regenerates_a_truncated_shard(in_tmp, capsys):
    outdir = in_tmp / "out"
    assert sample_main(_args(outdir, "0-5", "--format", "npz", "--batch-size", "3")) == 0
    shards = sorted((outdir / "npz").glob("*.npz"))
    assert len(shards) == 2
    expected = ImageStore(outdir, "npz")
    expected.scan(range(6), (1, 8, 8))
    images = expected.collect(range(6))
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    sampling._read_shard.cache_clear()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="unreadable or malformed"):
        assert sample_main(_args(outdir, "0-5", "--format", "npz", "--batch-size", "3")) == 0
    assert "3 generated" in capsys.readouterr().out
    store = ImageStore(outdir, "npz")
    store.scan(range(6), (1, 8, 8))
    sampling._read_shard.cache_clear()
    assert sorted(store.shard_of) == list(range(6)) and np.array_equal(store.collect(range(6)), images)


# --- 12: a full disk ends in one line and the rerun resumes -------------------------------------------------------------

def test_disk_full_is_one_line_and_resumable(in_tmp, capsys, monkeypatch):
    outdir = in_tmp / "out"
    real_write, calls = sampling.atomic_write_bytes, []

    def full_after_four(path, data):
        calls.append(path)
        if len(calls) > 4:  # the manifest and three images fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(sampling, "atomic_write_bytes", full_after_four)
    assert sample_main(_args(outdir, "0-7", "--batch-size", "3")) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "rerun the same command" in line
    assert sorted(_pngs(outdir)) == [0, 1, 2]
    assert not [p for p in outdir.rglob("*.tmp")]
    monkeypatch.setattr(sampling, "atomic_write_bytes", real_write)
    assert sample_main(_args(outdir, "0-7", "--batch-size", "3")) == 0
    assert sample_main(_args(in_tmp / "straight", "0-7")) == 0
    assert _pngs(outdir) == _pngs(in_tmp / "straight")


# --- 22: a second run into a folder in use is refused -------------------------------------------------------------------

def test_concurrent_run_into_the_same_outdir_is_refused(in_tmp, capsys):
    outdir = in_tmp / "out"
    outdir.mkdir()
    other = ImageStore(outdir, "npz")
    other.lock()  # what a running sample.py holds, with another --batch-size
    try:
        assert sample_main(_args(outdir, "0-3", "--format", "npz", "--batch-size", "3")) == 2
        assert "another sample.py run is writing into" in _one_error_line(capsys)
        assert not (outdir / "npz").exists() and not (outdir / "manifest.json").exists()
    finally:
        other.unlock()
    assert sample_main(_args(outdir, "0-3", "--format", "npz", "--batch-size", "3")) == 0
    assert sample_main(_args(outdir, "0-3", "--format", "npz", "--batch-size", "2")) == 0  # the lock was released


# --- 23: output files get the usual mode ---------------------------------------------------------------------------------

def test_written_files_follow_the_umask(in_tmp):
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(in_tmp / "x.bin", b"x")
        assert sample_main(_args(in_tmp / "out", "0-1", "--format", "both")) == 0
    finally:
        os.umask(previous)
    assert (in_tmp / "x.bin").stat().st_mode & 0o777 == 0o640
    outdir = in_tmp / "out"
    for path in [outdir / "manifest.json", outdir / "000000" / "000001.png", *(outdir / "npz").glob("*.npz")]:
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_lambda_file_follows_the_umask(tmp_path):
    """safetensors recreates the temporary with 0600; the λ file still gets 0644 under umask 022, like the others."""
    previous = os.umask(0o022)
    try:
        path = save_lambdas(tmp_path / "l.safetensors", {"lambdas": torch.zeros(3, dtype=torch.float64), "sigmas": make_solver("euler", 3).sigmas}, {"solver": "euler"})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


# --- 21: SIGTERM stops the run between batches, resumably ---------------------------------------------------------------

def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outdir = tmp_path / "out"
    command = [sys.executable, str(ROOT / "sample.py"), *_args(outdir, "0-299", "--batch-size", "1")]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pngs(process, outdir, 4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    partial = _pngs(outdir)
    assert 4 <= len(partial) < 300
    monkeypatch.chdir(tmp_path)
    assert sample_main(_args(outdir, "0-299", "--batch-size", "64")) == 0
    assert sorted(_pngs(outdir)) == list(range(300))


# --- 7, 8: λ files with non-finite or non-float λ, or tampered metadata ------------------------------------------------

def _lambda_file(path: Path, lambdas: torch.Tensor, metadata: str | None = "valid") -> Path:
    """A λ file written directly with safetensors (no checks), as an attacker or a damaged disk could leave it."""
    header = {"format": "dode-lightning/lambdas/1"}
    if metadata == "valid":
        header["metadata"] = json.dumps(build_student({"source": "gmm_digits"}, "heun", 9).metadata())
    elif metadata is not None:
        header["metadata"] = metadata
    save_file({"lambdas": lambdas}, str(path), metadata=header)
    return path


_NINE = torch.zeros(9, dtype=torch.float64)


@pytest.mark.parametrize(
    "case,lambdas,metadata,message",
    [
        ("nan", _NINE.clone().index_fill_(0, torch.tensor([3]), float("nan")), "valid", "λ_3 = nan"),
        ("inf", _NINE.clone().index_fill_(0, torch.tensor([1]), float("inf")), "valid", "λ_1 = inf"),
        ("huge", _NINE.clone().index_fill_(0, torch.tensor([2]), 1e300), "valid", "λ_2 = 1e+300"),
        ("int", torch.zeros(9, dtype=torch.int64), "valid", "dtype int64"),
        ("bool", torch.zeros(9, dtype=torch.bool), "valid", "dtype bool"),
        ("scalar", torch.tensor(0.0, dtype=torch.float64), "valid", "not a float tensor per stage"),
        ("nan_2d", torch.zeros(9, 2, dtype=torch.float64).index_fill_(1, torch.tensor([1]), float("nan")), "valid", "λ[0, 1] = nan"),
        ("truncated_json", _NINE, '{"solver": "heun", "nf', "no readable metadata"),
        ("no_metadata", _NINE, None, "no readable metadata"),
        ("json_list", _NINE, "[1, 2]", "no readable metadata"),
        ("json_deep", _NINE, "[" * 100_000 + "]" * 100_000, "no readable metadata"),
    ],
)
def test_bad_lambda_file_is_one_line_and_writes_nothing(in_tmp, capsys, case, lambdas, metadata, message):
    path = _lambda_file(in_tmp / "lam.safetensors", lambdas, metadata)
    args = _args(in_tmp / "out")
    args[args.index("--lambdas") + 1] = str(path)
    assert sample_main(args) == 2
    assert message in _one_error_line(capsys)
    assert not (in_tmp / "out").exists()


def test_save_lambdas_refuses_non_finite(tmp_path):
    with pytest.raises(LambdaFileError, match="finite"):
        save_lambdas(tmp_path / "l.safetensors", {"lambdas": torch.tensor([0.0, float("nan")])}, {})
    assert not list(tmp_path.iterdir())


# --- 9, 17, 18: the model section ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.denoiser.source", "hf_hub"], "unknown denoiser source 'hf_hub'"),
        (["--model.denoiser.colour", "red"], r"unknown option\(s\) colour"),
        (["--model.denoiser.path", "x.pkl"], "takes no path"),
        (["--model.sigma_min", "50", "--model.sigma_max", "1"], "0 < sigma_min < sigma_max"),
        (["--model.sigma_min", "-1"], "0 < sigma_min < sigma_max"),
        (["--model.sigma_max", ".inf"], "0 < sigma_min < sigma_max"),
        (["--model.rho", ".nan"], "finite rho > 0"),
        (["--model.nfe", "1000000000000"], "more than 10000"),
        (["--model.nfe", "0"], "got 0; use 1$"),
        (["--model.nfe", "-5"], "got -5; use 1$"),
        (["--model.nfe", "4"], "use 3 or 5"),
    ],
)
def test_bad_model_section_is_one_line_in_sample_py(in_tmp, capsys, override, message):
    assert sample_main(_args(in_tmp / "out", "0-1", *override)) == 2
    assert re.search(message, _one_error_line(capsys))
    assert not (in_tmp / "out").exists()


def _train_config(tmp_path: Path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false, enable_progress_bar: false}\n"
        "model: {denoiser: {source: gmm_digits}, solver: heun, nfe: 5}\n"
        "data: {scale: 2, batch_size: 6, class_conditional: false, cache_dir: " + json.dumps(str(tmp_path / "cache")) + "}\n"
    )
    return config


@pytest.fixture
def train(tmp_path, monkeypatch):
    """train.py in-process on a tiny config; records teacher runs."""
    monkeypatch.setattr(sys, "argv", ["train.py"])  # as from the shell: pytest's own arguments are not ours
    monkeypatch.chdir(tmp_path)
    config, teacher_runs, real_teacher = _train_config(tmp_path), [], lightning.teacher_targets

    def counted_teacher(*args, **kwargs):
        teacher_runs.append(1)
        return real_teacher(*args, **kwargs)

    monkeypatch.setattr(lightning, "teacher_targets", counted_teacher)

    def run(*extra: str, output: str = "l.safetensors") -> int:
        return train_main(["--config", str(config), "--model.output", str(tmp_path / output), "--exact_report", "false", *extra])

    run.teacher_runs = teacher_runs
    return run


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.denoiser.source", "hf_hub"], "unknown denoiser source"),
        (["--model.rho", "0"], "finite rho > 0"),
        (["--data.scale", "1000000"], "more than 1000000"),
        (["--data.seed", "4294967291"], "must lie in 0 … 4294967295"),
        (["--data.seed", "-1"], "must lie in 0 … 4294967295"),
    ],
)
def test_bad_model_section_is_one_line_in_train_py(train, capsys, override, message):
    assert train(*override) == 2
    assert message in _one_error_line(capsys)
    assert not train.teacher_runs


# --- 7, 14: the teacher cache ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["nan_targets", "too_few_stages", "wrong_noise_shape", "labels_where_none"])
def test_inconsistent_teacher_cache_is_rebuilt(train, tmp_path, damage):
    assert train(output="first.safetensors") == 0
    (cache,) = (tmp_path / "cache").glob("targets-*.pt")
    blob = torch.load(cache, weights_only=True)
    if damage == "nan_targets":
        blob["targets"][1, 0, 0, 0, 0] = float("nan")
    elif damage == "too_few_stages":
        blob["targets"] = blob["targets"][:-1]
    elif damage == "wrong_noise_shape":
        blob["noise"] = blob["noise"][:, :, :4]
    else:
        blob["labels"] = torch.zeros(len(blob["noise"]), 10, dtype=torch.float64)
    torch.save(blob, cache)
    with pytest.warns(UserWarning, match="inconsistent.*rebuilding"):
        assert train(output="second.safetensors") == 0
    assert len(train.teacher_runs) == 2
    first, _ = load_lambdas(tmp_path / "first.safetensors")
    second, _ = load_lambdas(tmp_path / "second.safetensors")
    assert torch.equal(first["lambdas"], second["lambdas"])


def test_teacher_with_nan_output_writes_no_lambda_file_and_no_cache(train, tmp_path, capsys, monkeypatch):
    def nan_teacher(*args, **kwargs):
        return torch.full_like(lightning_real_teacher(*args, **kwargs), float("nan"))

    lightning_real_teacher = lightning.teacher_targets
    monkeypatch.setattr(lightning, "teacher_targets", nan_teacher)
    assert train() == 2
    assert "non-finite" in _one_error_line(capsys)
    assert not (tmp_path / "l.safetensors").exists() and not list((tmp_path / "cache").glob("*.pt"))


def test_unusable_cache_or_output_fails_before_the_teacher(train, tmp_path, capsys):
    assert train(output="first.safetensors") == 0
    (cache,) = (tmp_path / "cache").glob("targets-*.pt")
    cache.unlink()
    cache.mkdir()
    assert train() == 2
    assert "is not a file" in _one_error_line(capsys) and len(train.teacher_runs) == 1
    cache.rmdir()
    (tmp_path / "out_dir").mkdir()
    assert train(output="out_dir") == 2  # 15: an existing directory as --model.output
    assert "is not a file" in _one_error_line(capsys) and len(train.teacher_runs) == 1
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "cache").chmod(0o555)
        try:
            assert train() == 2
            assert "is not writable" in _one_error_line(capsys) and len(train.teacher_runs) == 1
        finally:
            (tmp_path / "cache").chmod(0o755)
    assert not (tmp_path / "l.safetensors").exists()
