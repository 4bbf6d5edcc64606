"""Issue 21 items 10–17: runs that used to end badly without saying so now end in one `error:` line (or stop
cleanly), with nothing half-written: incomplete tokenizers, interrupts, a dead DDP rank, mistyped λ metadata, hostile
scheduler configs, crafted npz shards, mixed image folders, and a solver setting with no λ to fit."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dode_lightning.cli as cli
import dode_lightning.lightning as lightning
import dode_lightning.sampling as sampling
from dode_lightning.checkpoints import CheckpointError, load_denoiser
from dode_lightning.cli_common import forget_run_version, release_run_folders, unique_version
from dode_lightning.lambda_file import LambdaFileError, check_metadata, load_lambdas, save_lambdas
from dode_lightning.lightning import build_student
from dode_lightning.sample_cli import sample_main
from dode_lightning.sampling import ImageStore, RankWatchdog, rank_failure_check
from dode_lightning.solvers import make_solver
from tests.conftest import wait_for_pngs
from tests.test_run_hardening import CONFIG, ROOT, _args, _files, _one_error_line, in_tmp, train  # noqa: F401 (fixtures)

# --- 13: λ-file metadata of the wrong JSON type --------------------------------------------------------------------------

_VALID_META = build_student({"source": "gmm_digits"}, "heun", 9).metadata()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("nfe", "10", "'nfe' is '10', expected an integer"),
        ("nfe", True, "'nfe' is True, expected an integer"),
        ("grid_kwargs", [1, 2], "'grid_kwargs' is a list, expected an object of numbers"),
        ("grid_kwargs", {"rho": [7]}, "'grid_kwargs' is a dict, expected an object of numbers"),
        ("solver", 5, "'solver' is 5, expected a string"),
        ("history", "2", "'history' is '2', expected an integer"),
        ("class_conditional", "yes", "'class_conditional' is 'yes', expected true or false or null"),
        ("guidance_scale", "7.5", "'guidance_scale' is '7.5', expected a number or null"),
    ],
)
def test_mistyped_lambda_metadata_is_one_line(in_tmp, capsys, key, value, message):
    path = in_tmp / "lam.safetensors"
    header = {"format": "dode-lightning/lambdas/1", "metadata": json.dumps({**_VALID_META, key: value})}
    save_file({"lambdas": torch.zeros(9, dtype=torch.float64)}, str(path), metadata=header)
    args = _args(in_tmp / "out")
    args[args.index("--lambdas") + 1] = str(path)
    assert sample_main(args) == 2
    assert message in _one_error_line(capsys)
    assert not (in_tmp / "out").exists()


def test_an_image_that_cannot_be_written_is_named_not_its_temporary(in_tmp, capsys):
    """An atomic write whose rename fails (the image's path is a folder) names the image, not the hidden temporary."""
    blocked = in_tmp / "out" / "000000" / "000002.png"
    blocked.mkdir(parents=True)
    assert sample_main(_args(in_tmp / "out", "0-3", "--batch-size", "1")) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: writing the samples failed (Is a directory: {blocked}); 2 new image(s) are kept"), line
    assert sorted(p.name for p in blocked.parent.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_well_typed_metadata_passes_the_check():
    check_metadata({**_VALID_META, "guidance_scale": 7, "class_conditional": None, "dropped_stages": [0, 3], "extra": [1]}, "f")
    with pytest.raises(LambdaFileError, match="'dropped_stages' is a list, expected a list of integers"):
        check_metadata({"dropped_stages": ["0"]}, "f")


# --- 17: a solver setting without any λ to fit -----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_nfe_without_a_lambda_to_fit_is_refused(train, tmp_path, capsys, solver):
    assert train("--model.solver", solver, "--model.nfe", "1") == 2
    assert f"{solver} with NFE 1 has no λ to fit" in _one_error_line(capsys)
    assert not train.teacher_runs and not (tmp_path / "l.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no cache, no config.yaml, no run folder


# --- 14: a hostile scheduler_config.json for export-scheduler ----------------------------------------------------------------

@pytest.mark.parametrize(
    "content,message",
    [
        ("[" * 100_000 + "]" * 100_000, "unreadable JSON"),
        ('{"num_train_timesteps": ' + "9" * 5000 + "}", "unreadable JSON"),
        ('{"pad": "' + "x" * (2 << 20) + '"}', "larger than 1 MiB"),
    ],
    ids=["deep", "long_integer", "large"],
)
def test_export_scheduler_reads_the_pipeline_config_with_the_loaders_limits(tmp_path, capsys, content, message):
    pytest.importorskip("diffusers")
    from dode_lightning.sample_cli import export_scheduler_main

    lambdas = save_lambdas(tmp_path / "l.safetensors", {"lambdas": torch.zeros(4), "sigmas": make_solver("ddim", 4).sigmas}, {"solver": "ddim", "nfe": 4, "schedule": "VPDiscrete{}"})
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(content)
    out = tmp_path / "out"
    assert export_scheduler_main(["--lambdas", str(lambdas), "--pipeline", str(tmp_path / "pipe"), "--out", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


# --- 10: an empty, incomplete or oversized tokenizer/ ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.pipelines import write_tiny_sd_pipeline

    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


def _with_tokenizer(tiny_sd: Path, tmp_path: Path, keep: tuple[str, ...], extra: dict[str, object] | None = None) -> Path:
    """A copy of the tiny SD pipeline whose tokenizer/ holds only the files `keep`, plus the files `extra` (text, or
    data written as JSON)."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd, folder)
    for path in (folder / "tokenizer").iterdir():
        if path.name not in keep:
            path.unlink()
    for name, data in (extra or {}).items():
        (folder / "tokenizer" / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


@pytest.mark.parametrize(
    "keep,extra,message",
    [
        ((), None, "no vocabulary"),
        (("tokenizer_config.json",), None, "no vocabulary"),
        (("tokenizer_config.json",), {"vocab.json": {}, "merges.txt": "#version: 0.2\n"}, "holds 2 token"),
        (("tokenizer.json", "tokenizer_config.json"), {"special_tokens_map.json": {"additional_special_tokens": [f"<t{i}>" for i in range(200_000)]}}, r"20000\d added or special tokens"),
    ],
    ids=["empty", "config_only", "empty_vocab", "200k_special_tokens"],
)
def test_tokenizer_without_a_real_vocabulary_is_refused(tiny_sd, tmp_path, keep, extra, message):
    folder = _with_tokenizer(tiny_sd, tmp_path, keep, extra)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as err:
        load_denoiser("diffusers_pipeline", folder, prompts=["a red cat", "a blue dog"])
    assert "\n" not in str(err.value) and "tokenizer" in str(err.value)
    assert time.perf_counter() - started < 60  # 200k special tokens took 205 s to load before the bound



# --- 15: crafted npz shards in one's own outdir ------------------------------------------------------------------------------

def _shard(path: Path, seeds: list[int], compressed: bool = False) -> None:
    """A shard with the keys and shapes sample.py writes (1×8×8 images), written with numpy directly."""
    save = np.savez_compressed if compressed else np.savez
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, seeds=np.asarray(seeds, dtype=np.int64), images=np.full((len(seeds), 8, 8, 1), 7, np.uint8), labels=np.full(len(seeds), -1, np.int64))


def _npz_args(outdir: Path, seeds: str = "0-3") -> list[str]:
    return _args(outdir, seeds, "--format", "npz", "--batch-size", "2")


@pytest.mark.parametrize("case", ["compressed", "repeated_seed", "header_lies", "too_many_seeds"])
def test_shard_that_sample_py_did_not_write_is_not_trusted(in_tmp, capsys, monkeypatch, case):
    outdir = in_tmp / "out"
    crafted = outdir / "npz" / "seeds-000001-n3.npz"
    if case == "too_many_seeds":  # more seeds than a run may hold: their array is not read
        monkeypatch.setattr(sampling, "MAX_SEEDS", 2)
    if case == "header_lies":  # a stored member declaring 3.6 GB of pixels: refused from its header, nothing read
        _shard(crafted, [1])
        with zipfile.ZipFile(crafted, "a") as archive:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1, 30000, 30000, 4)})
            with pytest.warns(UserWarning, match="Duplicate name"):
                archive.writestr("images.npy", header.getvalue())
    else:
        seeds = {"repeated_seed": [1, 1, 1], "too_many_seeds": [1, 9, 10]}.get(case, [1])
        _shard(crafted, seeds, compressed=case == "compressed")
    with pytest.warns(UserWarning, match="unreadable or malformed"):
        assert sample_main(_npz_args(outdir)) == 0
    assert "4 generated" in capsys.readouterr().out
    store = ImageStore(outdir, "npz")
    with pytest.warns(UserWarning, match="unreadable or malformed"):
        store.scan(range(4), (1, 8, 8))
    sampling._read_shard.cache_clear()
    assert sorted(store.shard_of) == [0, 1, 2, 3] and store.shard_of[1] != crafted
    assert not (store.collect(range(4)) == 7).all()


def test_shards_claiming_the_same_seed_are_refused_in_one_line(in_tmp, capsys):
    outdir = in_tmp / "out"
    assert sample_main(_npz_args(outdir)) == 0
    _shard(outdir / "npz" / "seeds-000001-n1.npz", [1])
    before = _files(outdir)
    assert sample_main(_npz_args(outdir, "0-7")) == 2
    line = _one_error_line(capsys)
    assert "seeds-000000-n2.npz and seeds-000001-n1.npz" in line and "both hold seed 1" in line
    assert _files(outdir) == before


# --- 16: sample.py fid on a folder with foreign or differently sized images ---------------------------------------------------

def _png(path: Path, size: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 128).save(path)


def _fid(images: Path) -> list[str]:
    return ["fid", "--images", str(images), "--fid-ref", "exact", "--fid-ref-count", "50"]


def test_fid_of_a_sample_folder_scores_the_manifests_seeds_only(in_tmp, capsys):
    outdir = in_tmp / "out"
    assert sample_main(_args(outdir, "0-3")) == 0
    _png(outdir / "000000" / "000999.png", 8)  # an 8×8 file the run did not write
    _png(outdir / "extra" / "big.png", 16, "RGB")
    capsys.readouterr()
    assert sample_main(_fid(outdir)) == 0
    assert "(n = 4," in capsys.readouterr().out
    (outdir / "000000" / "000002.png").unlink()
    assert sample_main(_fid(outdir)) == 2
    assert "1 of the 4 seeds in" in _one_error_line(capsys)


@pytest.mark.parametrize("size,mode", [(16, "L"), (8, "RGB")])
def test_fid_of_a_folder_with_mixed_image_sizes_is_one_line(in_tmp, capsys, size, mode):
    folder = in_tmp / "images"
    for i in range(3):
        _png(folder / f"{i}.png", 8)
    _png(folder / "other.png", size, mode)
    assert sample_main(_fid(folder)) == 2
    line = _one_error_line(capsys)
    assert "images of different sizes" in line and "other.png" in line


# --- 11: SIGINT and SIGTERM in train.py and sample.py ------------------------------------------------------------------------

_TENSORBOARD = json.dumps({"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "cal"}})


def _run_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _signal_during(monkeypatch, owner: object, name: str, signum: int, after: bool = False) -> None:
    """Make `owner.name` send `signum` to this process before (or after) doing its work, as a user's kill would."""
    real = getattr(owner, name)

    def interrupted(*args, **kwargs):
        if not after:
            os.kill(os.getpid(), signum)
        result = real(*args, **kwargs)
        if after:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("phase,signum", [("teacher_targets", signal.SIGINT), ("fit_closed_form", signal.SIGTERM), ("teacher_targets", signal.SIGTERM)])
def test_interrupted_calibration_writes_nothing_and_leaves_no_run(train, tmp_path, capsys, monkeypatch, phase, signum):
    earlier = tmp_path / "l.safetensors"
    earlier.write_bytes(b"an earlier run's lambda file")
    _signal_during(monkeypatch, lightning, phase, signum)
    assert train("--trainer.logger", _TENSORBOARD) == 128 + signum
    line = _one_error_line(capsys)
    name = signal.Signals(signum).name
    assert line.startswith(f"error: stopped by {name}; no λ file written ({earlier} there now is an earlier run's); rerun the same command")
    assert ("the teacher targets are cached" in line) == (phase == "fit_closed_form")
    assert earlier.read_bytes() == b"an earlier run's lambda file"
    assert _run_folders(tmp_path / "runs" / "cal") == []
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.chdir(tmp_path)
    assert train("--trainer.logger", _TENSORBOARD) == 0
    assert _run_folders(tmp_path / "runs" / "cal") == ["heun_nfe5_aligned_closed_form"]  # not _2


def test_interrupt_after_the_lambda_file_keeps_it_and_the_run(train, tmp_path, capsys, monkeypatch):
    _signal_during(monkeypatch, cli, "save_lambdas", signal.SIGINT, after=True)
    assert train("--trainer.logger", _TENSORBOARD) == 130
    assert f"after the λ file was written: {tmp_path / 'l.safetensors'} is complete" in _one_error_line(capsys)
    load_lambdas(tmp_path / "l.safetensors")
    assert _run_folders(tmp_path / "runs" / "cal") == ["heun_nfe5_aligned_closed_form"]


def test_run_folders_are_claimed_atomically_and_released(tmp_path):
    forget_run_version()
    assert unique_version(tmp_path, "run") == "run" and (tmp_path / "run").is_dir()
    forget_run_version()  # a second run started before the first wrote anything gets its own folder
    assert unique_version(tmp_path, "run") == "run_2"
    release_run_folders()
    assert _run_folders(tmp_path) == ["run"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_sampling_is_one_line_and_resumes(in_tmp, capsys, monkeypatch, signum):
    outdir = in_tmp / "out"
    args = _args(outdir, "0-7", "--batch-size", "2", "--fid-ref", "exact", "--fid-ref-count", "50")
    _signal_during(monkeypatch, sampling.SampleWriter, "write_on_batch_end", signum, after=True)
    assert sample_main(args) == 128 + signum
    line = _one_error_line(capsys)
    assert line.startswith(f"error: stopped by {signal.Signals(signum).name} after 2 new image(s)") and str(outdir) in line
    assert len(list(outdir.rglob("0*.png"))) == 2 and not list(outdir.rglob("*.tmp"))
    assert _run_folders(in_tmp / "runs" / "sampling") == []  # the FID run's TensorBoard folder is gone
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    assert sample_main(args) == 0
    assert "6 generated" in capsys.readouterr().out
    assert _run_folders(in_tmp / "runs" / "sampling") == ["heun_nfe9_base"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_the_scripts_import_is_one_line(signum):
    """train.py and sample.py install start_signals' handling before importing the package (seconds of imports)."""
    starting = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from start_signals import stop_cleanly_while_starting; "
        "stop_cleanly_while_starting(); print('importing', flush=True); import time; time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", starting], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "importing\n"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert stderr.strip() == f"error: stopped by {signal.Signals(signum).name} while starting; nothing was written"
    assert all("stop_cleanly_while_starting()" in (ROOT / script).read_text() for script in ("train.py", "sample.py"))


def _command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _wait_for_text(process: subprocess.Popen, path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_stops_real_train_and_sample_processes(tmp_path):
    """Real processes and a real SIGINT (the in-process tests above deliver it with os.kill): train.py during its
    teacher, then sample.py mid-run; two identical train.py runs started together log into two run folders."""
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("runs/cache", str(tmp_path / "cache")).replace("save_dir: runs", f"save_dir: {tmp_path / 'runs'}"))
    train = _command("train.py", "--config", str(config), "--exact_report", "false", "--model.output", str(tmp_path / "l.safetensors"))
    log = tmp_path / "train.err"
    with open(log, "w") as err:
        process = subprocess.Popen([*train, "--data.batch_size", "20000"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        _wait_for_text(process, log, "teacher (")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    assert log.read_text().strip().splitlines()[-1].startswith("error: stopped by SIGINT; no λ file written; rerun the same command")
    assert not (tmp_path / "l.safetensors").exists() and _run_folders(tmp_path / "runs" / "gmm_digits") == []
    together = [subprocess.Popen(train, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=600) for p in together] == [0, 0]
    assert _run_folders(tmp_path / "runs" / "gmm_digits") == ["heun_nfe9_aligned_closed_form", "heun_nfe9_aligned_closed_form_2"]
    outdir = tmp_path / "out"
    process = subprocess.Popen(_command("sample.py", *_args(outdir, "0-299", "--batch-size", "1")), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pngs(process, outdir, 4)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGINT after")


# --- 12: one DDP rank dies mid-run ---------------------------------------------------------------------------------------------

def _fake_trainer(local_rank: int, launcher: object) -> SimpleNamespace:
    return SimpleNamespace(world_size=2, node_rank=0, num_devices=2, local_rank=local_rank, global_rank=local_rank, strategy=SimpleNamespace(launcher=launcher))


def _watch(trainer: SimpleNamespace) -> tuple[RankWatchdog, list[str], threading.Event]:
    messages, stopped = [], threading.Event()
    watchdog = RankWatchdog(interval=0.01, stop=lambda message: (messages.append(message), stopped.set()))
    watchdog.setup(trainer, None, "predict")
    return watchdog, messages, stopped


@pytest.mark.parametrize("how", ["killed", "error", "interrupted"])
def test_rank_watchdog_of_rank_0_names_the_launched_rank_that_died(how):
    exit_code = {"killed": 0, "error": 2, "interrupted": 130}[how]
    code = "import time; time.sleep(60)" if how == "killed" else f"import time, sys; time.sleep(0.3); sys.exit({exit_code})"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        watchdog, messages, stopped = _watch(_fake_trainer(0, SimpleNamespace(procs=[child])))
        time.sleep(0.1)
        assert not messages  # all ranks alive
        if how == "killed":
            child.kill()
        if how == "interrupted":  # a rank stopped by Ctrl-C: rank 0 (which got it too) first has a grace period
            child.wait()
            assert not stopped.wait(sampling.INTERRUPT_GRACE / 2)
        assert stopped.wait(30)
        ended = "was killed by SIGKILL" if how == "killed" else f"ended with exit code {exit_code}"
        assert messages == [f"rank 1 (pid {child.pid}) {ended}, so rank 0 stopped too; every file written is whole: rerun the same command to resume"]
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("error", [RuntimeError("Connection closed by peer"), OSError("disk full")], ids=["collective", "own"])
def test_rank_0_whose_closing_barrier_broke_names_the_rank_still_exiting(error):
    """The closing barrier breaks while the failed rank 1 is still exiting (its watch has ended with predict): rank 0
    waits for its exit code and names it. An error of rank 0's own (not a collective's) is reported at once."""
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(2)"])
    try:
        watchdog, messages, _ = _watch(_fake_trainer(0, SimpleNamespace(procs=[child])))
        watchdog.on_predict_end(None, None)
        watchdog.on_exception(None, None, error)
        if isinstance(error, RuntimeError):
            assert messages == [f"rank 1 (pid {child.pid}) ended with exit code 2, so rank 0 stopped too; every file written is whole: rerun the same command to resume"]
        else:
            assert messages == []  # a wait would have seen the child's exit code 2 half a second later
    finally:
        child.kill()
        child.wait()


def test_a_collective_that_broke_before_the_watch_started_still_names_the_dead_rank():
    """train.py: the teacher runs in the datamodule's setup, before the callbacks' setup starts the watch; a rank that
    died there is named when the survivor's collective breaks, with train.py's advice."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        messages = []
        watchdog = RankWatchdog(interval=0.01, stop=messages.append, advice="no λ file written: rerun the same command to calibrate")
        watchdog.on_exception(_fake_trainer(0, SimpleNamespace(procs=[child])), None, RuntimeError("Connection reset by peer"))
        assert messages == [f"rank 1 (pid {child.pid}) ended with exit code 3, so rank 0 stopped too; no λ file written: rerun the same command to calibrate"]
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the launched rank through /proc")
def test_ddp_calibration_stops_in_one_line_when_a_rank_dies(tmp_path):
    """train.py on two gloo ranks (CPU), rank 1 killed during a long Adam fit: rank 0 stops within seconds with one
    line naming it, exit code 1, and no λ file."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {denoiser: {source: gmm_digits}, solver: euler, nfe: 4, fit: adam, adam_steps: 100000}\ndata: {cache_dir: null}\n")
    output = tmp_path / "l.safetensors"
    args = ["--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger", "false", "--model.output", str(output)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(_command("train.py", *args), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr_file, text=True)
        _wait_for_text(process, log, "fit (adam)")
        child = _launched_rank(process)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        process.wait(timeout=120)
    stderr = log.read_text(errors="replace")
    assert time.monotonic() - killed < 10 and process.returncode == 1, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]  # on its own line, not after the bar
    assert lines == [f"error: rank 1 (pid {child}) was killed by SIGKILL, so rank 0 stopped too; no λ file written: rerun the same command to calibrate"]
    assert not output.exists()


def test_a_launched_rank_whose_collective_broke_waits_to_name_rank_0(monkeypatch):
    """Rank 0 killed: rank 1's collective breaks before rank 1 is re-parented (the socket closes first); it waits for
    that and names rank 0 instead of printing gloo's traceback."""
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    parent = os.getppid()
    calls, messages = iter(range(1_000_000)), []
    watchdog = RankWatchdog(interval=0.01, stop=messages.append)
    late = RankWatchdog(interval=0.01, stop=messages.append)  # built at the rank's start, bound only on the error
    watchdog._bind(_fake_trainer(1, object.__new__(_SubprocessScriptLauncher)))
    monkeypatch.setattr(os, "getppid", lambda: parent if next(calls) < 5 else 1)  # re-parented a few polls later
    watchdog.on_exception(None, None, RuntimeError("Connection reset by peer"))
    assert len(messages) == 1 and messages[0].startswith(f"rank 0 (pid {parent}) ended, so rank 1 stopped too")
    # Rank 0 gone before the watch ever started (train.py's teacher): the parent seen when the watchdog was built.
    messages.clear()
    late.on_exception(_fake_trainer(1, object.__new__(_SubprocessScriptLauncher)), None, RuntimeError("Connection reset by peer"))
    assert messages == [f"rank 0 (pid {parent}) ended, so rank 1 stopped too; every file written is whole: rerun the same command to resume"]


def test_rank_watchdog_of_a_launched_rank_notices_rank_0_is_gone(monkeypatch):
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    parent = os.getppid()
    watchdog, messages, stopped = _watch(_fake_trainer(1, object.__new__(_SubprocessScriptLauncher)))
    time.sleep(0.1)
    assert not messages
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented: the launching process is gone
    assert stopped.wait(30)
    assert messages[0].startswith(f"rank 0 (pid {parent}) ended, so rank 1 stopped too")


def test_rank_watchdog_ends_with_predict_and_needs_ddp():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watchdog, messages, _ = _watch(_fake_trainer(0, SimpleNamespace(procs=[child])))
        watchdog.on_predict_end(None, None)  # the other ranks may now end on their own
        child.kill()
        child.wait()
        time.sleep(0.2)
        assert not messages
    finally:
        child.kill()
    single = SimpleNamespace(world_size=1)
    assert rank_failure_check(single) is None


def _ddp_sample(outdir: Path, seeds: str = "0-99999") -> subprocess.Popen:
    args = _args(outdir, seeds, "--batch-size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    return subprocess.Popen(_command("sample.py", *args), cwd=outdir.parent, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _launched_rank(process: subprocess.Popen) -> int:
    return int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the launched rank through /proc")
@pytest.mark.parametrize("victim", ["rank1_killed", "rank0_killed", "rank1_write_fails"])
def test_ddp_sampling_stops_when_one_rank_dies(tmp_path, victim):
    """sample.py on two gloo ranks (CPU): one dies mid-run; the other stops within seconds (measured ≈ 0.3–0.6 s on a
    loaded 2-core machine) with one line naming it, and a rerun finishes the seeds."""
    outdir = tmp_path / "out"
    if victim == "rank1_write_fails":  # seed 41 belongs to rank 1 (seeds are dealt out r, r + 2, …)
        (outdir / "000000" / "000041.png").mkdir(parents=True)
    process = _ddp_sample(outdir, "0-299")
    wait_for_pngs(process, outdir, 10)
    child = _launched_rank(process)
    if victim == "rank1_killed":
        os.kill(child, signal.SIGKILL)
    elif victim == "rank0_killed":
        os.kill(process.pid, signal.SIGKILL)
    started = time.monotonic()
    if victim == "rank0_killed":
        while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text():
            assert time.monotonic() - started < 10
            time.sleep(0.01)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if victim == "rank1_killed":
        assert time.monotonic() - started < 10 and process.returncode == 1
        assert lines == [f"error: rank 1 (pid {child}) was killed by SIGKILL, so rank 0 stopped too; every file written is whole: rerun the same command to resume"]
    elif victim == "rank0_killed":
        assert lines == [f"error: rank 0 (pid {process.pid}) ended, so rank 1 stopped too; every file written is whole: rerun the same command to resume"]
    else:
        assert process.returncode == 1 and len(lines) == 2
        assert lines[0].startswith("error: writing the samples failed (Is a directory: ") and f"{outdir / '000000' / '000041.png'})" in lines[0]
        assert lines[1].startswith(f"error: rank 1 (pid {child}) ended with exit code 2, so rank 0 stopped too")
        (outdir / "000000" / "000041.png").rmdir()
    rerun = subprocess.run(_command("sample.py", *_args(outdir, "0-299", "--batch-size", "64")), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(int(p.stem) for p in outdir.rglob("0*.png")) == list(range(300))


def test_released_run_leaves_no_parent_folders_it_created(tmp_path):
    """A refused run (bad config) in a fresh directory leaves no empty `runs/<config>/` behind; parents that held
    something before stay."""
    forget_run_version()
    unique_version(tmp_path / "runs" / "cfg", "run")
    release_run_folders()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs" / "other").mkdir(parents=True)
    forget_run_version()
    unique_version(tmp_path / "runs" / "cfg", "run")
    release_run_folders()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]


def test_refused_train_py_config_writes_nothing(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert cli.train_main(["--config", str(CONFIG), "--model.nfe", "0"]) == 2
    assert _one_error_line(capsys).startswith("error: heun makes 2N − 1 evaluations")
    assert list(in_tmp.iterdir()) == []  # no runs/gmm_digits/ either
