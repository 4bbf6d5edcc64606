"""Crafted EDM pickles that attack the reader's resources rather than run code (issue 13, items 2–6): deep
nesting, huge counts, malformed contents, terminal-control text, tensor records and storage blobs that claim more
than they hold, zip bombs. Each ends in one printable CheckpointError line, in the loader and in both CLIs."""
import io
import pickle
import sys

import pytest
import torch

from dode_lightning.checkpoints import CheckpointError, load_denoiser
from dode_lightning.checkpoints import edm_pickle
from dode_lightning.checkpoints.edm_writer import StoredTensor, deflated_zip_blob, dumps, legacy_storage_blob, network_record, persistent_record
from dode_lightning.cli import train_main
from dode_lightning.networks import EDMPrecond
from dode_lightning.sample_cli import sample_main

TINY = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


def deep_key_pickle(depth: int) -> bytes:
    """{((…((),)…),): 1}: a dict key that is a tuple nested `depth` deep (hashing it recurses in C)."""
    return b"\x80\x04}" + b")" + b"\x85" * depth + b"K\x01s."


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_denoiser("edm_pickle", path)
    message = str(err.value)
    assert message.isprintable() and len(message) < 400, message
    return message


def _write(tmp_path, data: bytes, name: str = "crafted.pkl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("depth", [20_000, 1_000_000])
def test_deeply_nested_key_is_refused(tmp_path, depth):
    # Before the bound: 2·10⁴ deep gave a RecursionError traceback, 10⁶ deep a segmentation fault.
    message = _refusal(_write(tmp_path, deep_key_pickle(depth)))
    assert f"nested more than {edm_pickle.MAX_NESTING} deep" in message


def test_deep_list_and_self_reference_are_refused(tmp_path):
    # Lists are not hashed while loading; the finished object is checked before anything recurses into it.
    deep_list = b"\x80\x04" + b"]" * 5000 + b"a" * 4999 + b"."
    assert f"nested more than {edm_pickle.MAX_NESTING} deep" in _refusal(_write(tmp_path, deep_list))
    self_containing = b"\x80\x04]\x94h\x00a."  # L = []; L.append(L)
    assert "contains itself" in _refusal(_write(tmp_path, self_containing))


def test_operation_budget_bounds_container_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(edm_pickle._RestrictedUnpickler, "max_operations", 1000)
    big_list = b"\x80\x04](" + b"N" * 2000 + b"e."  # a list of 2000 Nones: about 2000 operations
    assert "more than 1,000 pickle operations" in _refusal(_write(tmp_path, big_list))


def _tiny_record() -> object:
    return network_record(EDMPrecond(**TINY))


def _state(record) -> dict:
    return record.meta["state"]


@pytest.mark.parametrize(
    "case,expected",
    [
        ("huge_int_key", "no 'ema' entry (keys: an integer of 16610 bits)"),
        ("integer_parameter_name", "has a parameter named 7, not a string"),
        ("non_persistent_set_not_a_set", "malformed _parameters/_buffers/_non_persistent_buffers_set/_modules"),
        ("integer_submodule_name", "has a submodule named 3, not a string"),
    ],
)
def test_malformed_snapshot_contents(tmp_path, case, expected):
    # Before: ValueError while formatting 10**5000, TypeError for the int name and for `n not in 5`.
    record = _tiny_record()
    if case == "huge_int_key":
        snapshot = {10**5000: 1}
    else:
        snapshot = {"ema": record}
        state = _state(record)
        if case == "integer_parameter_name":
            state["_modules"]["model"].meta["state"]["_parameters"][7] = torch.zeros(1)
        elif case == "non_persistent_set_not_a_set":
            state["_non_persistent_buffers_set"] = 5
        else:
            state["_modules"][3] = state["_modules"]["model"]
    assert expected in _refusal(_write(tmp_path, dumps(snapshot)))


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"num_blocks": 2000}, "more than"),  # before: 26 s building 44 k layers; 10⁹ never finished
        ({"M": 10**9}, "stored init argument 'M' is 1000000000"),  # iDDPM's σ table loops M times
        ({"channel_mult": [1] * 1000}, "stored init argument 'channel_mult' has 1000 entries"),
    ],
    ids=["num_blocks", "loop_count", "long_list"],
)
def test_init_kwargs_cannot_describe_a_huge_network(tmp_path, change, expected):
    record = _tiny_record()
    _state(record)["_init_kwargs"].update(change)
    message = _refusal(_write(tmp_path, dumps({"ema": record})))
    assert "cannot rebuild EDMPrecond" in message and expected in message


def test_untrusted_text_is_quoted_and_shortened(tmp_path):
    fake = "net\n\x1b[2J\x1b[31mFAKE: all good"
    message = _refusal(_write(tmp_path, pickle.dumps({fake: 1}, protocol=4)))
    assert "\x1b" not in message and "\n" not in message and "\\x1b[2J" in message
    long_key = "k" * 100_000
    assert len(_refusal(_write(tmp_path, pickle.dumps({long_key: 1}, protocol=4)))) < 200
    # A global's name is text from the file too.
    module = b"os\x1b[2Jevil"
    evil_global = b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c\x06system\x93."  # STACK_GLOBAL
    message = _refusal(_write(tmp_path, evil_global))
    assert "refused global" in message and "\x1b" not in message
    record = persistent_record("EDM\x1b[31mPrecond" + "x" * 1000, {"_init_kwargs": dict(TINY)})
    message = _refusal(_write(tmp_path, dumps({"ema": record})))
    assert "\\x1b[31m" in message and "\x1b" not in message


def _with_weight(weight) -> bytes:
    """The tiny network's snapshot with `model.map_layer0.weight` replaced by `weight` (a (32, 8) tensor)."""
    record = _tiny_record()
    layer = _state(record)["_modules"]["model"].meta["state"]["_modules"]["map_layer0"]
    assert tuple(layer.meta["state"]["_parameters"]["weight"].shape) == (32, 8)
    layer.meta["state"]["_parameters"]["weight"] = weight
    return dumps({"ema": record})


def test_the_tensor_record_writer_round_trips(tmp_path):
    """The crafted records below differ from this one only in geometry: this one loads."""
    loaded = load_denoiser("edm_pickle", _write(tmp_path, _with_weight(StoredTensor(legacy_storage_blob(torch.zeros(256)), (32, 8), (8, 1)))))
    assert torch.equal(loaded.denoiser.model.map_layer0.weight, torch.zeros(32, 8))


@pytest.mark.parametrize(
    "held,size,stride,offset",
    [(16, (32, 8), (8, 1), 0), (256, (32, 8), (8, 1), 1), (1, (32, 8), (0, 0), 0), (256, (32, 8), (1, 1 << 62), 0)],
    ids=["fewer_elements", "offset_past_end", "stride_zero_broadcast", "huge_stride"],
)
def test_tensor_record_claiming_more_than_its_storage_is_refused(tmp_path, held, size, stride, offset):
    # Before: set_ grew the storage with uninitialised memory and the network loaded (and sampled) with it.
    message = _refusal(_write(tmp_path, _with_weight(StoredTensor(legacy_storage_blob(torch.zeros(held)), size, stride, offset))))
    assert f"its storage holds {held}" in message


def test_legacy_blob_reader_matches_torch(tmp_path):
    values = torch.arange(256, dtype=torch.float32)
    blob = legacy_storage_blob(values)
    read_by_torch = torch.load(io.BytesIO(blob), weights_only=True)  # the crafted stream is what torch writes
    assert torch.equal(torch.tensor(read_by_torch.tolist(), dtype=torch.float32), values)
    loaded = load_denoiser("edm_pickle", _write(tmp_path, _with_weight(StoredTensor(blob, (32, 8), (8, 1)))))
    assert torch.equal(loaded.denoiser.model.map_layer0.weight, values.reshape(32, 8))


@pytest.mark.parametrize(
    "claimed,stored,count", [(10**10, None, 256), (256, 10**10, 256), (256, 256, 255), (256, 256, 257)],
    ids=["header_claims_huge", "count_claims_huge", "truncated", "trailing_data"],
)
def test_storage_blob_must_hold_what_it_claims(tmp_path, claimed, stored, count):
    # Before: torch's legacy reader allocated claimed × 4 bytes (40 GB here) before reading the data.
    blob = legacy_storage_blob(torch.zeros(count), claimed, stored)
    message = _refusal(_write(tmp_path, _with_weight(StoredTensor(blob, (32, 8), (8, 1)))))
    assert "a storage blob claims" in message


def test_zip_bomb_storage_blob_is_refused_unread(tmp_path, monkeypatch):
    # Before: torch.load inflated every member in memory (4.2 MB file → 4.6 GB resident) before any check.
    inflated = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: inflated.append(1) or pytest.fail("torch.load reached"))
    bomb = deflated_zip_blob(8 << 20)
    assert len(bomb) < 200_000
    message = _refusal(_write(tmp_path, _with_weight(StoredTensor(bomb, (32, 8), (8, 1)))))
    assert "a storage blob is a zip archive" in message and not inflated


def _config(tmp_path, pickle_path) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false}\n"
        f"model: {{denoiser: {{source: edm_pickle, path: {pickle_path}}}, solver: heun, nfe: 3}}\n"
        "data: {batch_size: 2, cache_dir: null}\n"
    )
    return str(config)


@pytest.mark.parametrize("cli", ["train", "sample"])
def test_both_clis_end_in_one_line(tmp_path, capsys, monkeypatch, cli):
    monkeypatch.setattr(sys, "argv", [f"{cli}.py"])
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, _write(tmp_path, deep_key_pickle(1_000_000)))
    if cli == "train":
        code = train_main(["--config", config])
    else:
        code = sample_main(["--config", config, "--lambdas", "none", "--seeds", "0-1", "--outdir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nested more than" in err[0], err
    assert not (tmp_path / "out").exists()
