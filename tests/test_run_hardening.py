"""Issue 13: bad inputs and hostile or damaged files end in one `error:` line (exit 2) with nothing created or lost;
sampling deletes only its own temporaries, verifies what it resumes from, and stops cleanly on SIGTERM or a full disk."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dode_lightning.sampling as sampling
from dode_lightning.atomic import atomic_write_bytes
from dode_lightning.distill import seeded_noise
from dode_lightning.lightning import ConfigError
from dode_lightning.sample_cli import sample_main
from dode_lightning.sampling import ImageStore, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_digits.yaml"


def _args(outdir: Path, seeds: str = "0-3", *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--lambdas", "none", "--seeds", seeds, "--outdir", str(outdir), *extra]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → content); directories as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _pngs(outdir: Path) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in sorted(outdir.rglob("*.png"))}


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

@pytest.mark.parametrize("case", ["png_folder_is_file", "npz_is_file", "manifest_is_dir", "manifest_is_list", "manifest_without_identity", "manifest_deep"])
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
        content = [] if case == "manifest_is_list" else {"format": sampling.MANIFEST_FORMAT, "seeds": "0-3"}
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


# --- 21: SIGTERM stops the run between batches, resumably ---------------------------------------------------------------

def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outdir = tmp_path / "out"
    command = [sys.executable, str(ROOT / "sample.py"), *_args(outdir, "0-999", "--batch-size", "2")]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(outdir.rglob("*.png"))) < 4:
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    partial = _pngs(outdir)
    assert 4 <= len(partial) < 1000
    result = subprocess.run([*command[:-2], "--batch-size", "64"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(_pngs(outdir)) == list(range(1000))
