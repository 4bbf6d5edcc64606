"""Untrusted EDM pickles: code-running payloads are refused before anything runs, malformed files give one-line
errors. Each payload is first shown to be live under plain `pickle.loads`, so these tests can fail."""
import builtins
import io
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

from dode_lightning.checkpoints import CheckpointError, RefusedGlobalError, load_denoiser
from dode_lightning.checkpoints.edm_pickle import ALLOWED_GLOBALS, ModuleDictRecord
from dode_lightning.checkpoints.edm_writer import dumps, persistent_record, snapshot_bytes
from dode_lightning.networks import EDMPrecond
from tests.conftest import fixture_path


TINY = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


class MarkerOnInit:
    """An 'unknown class' whose constructor has a side effect (creates the marker file)."""

    def __init__(self, path: str) -> None:
        open(path, "w").close()


class Payload:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class UnknownClassPayload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return MarkerOnInit, (self.path,)


class PermissiveUnpickler(pickle.Unpickler):
    """Plain unpickling, with EDM's persistence hook stubbed out (torch_utils is not installed)."""

    def find_class(self, module, name):
        if module == "torch_utils.persistence":
            return lambda meta: meta
        return super().find_class(module, name)


def _payloads(marker: str) -> dict:
    touch = f"open({marker!r}, 'w').close()"
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), "system"),
        "builtins.exec": (Payload(builtins.exec, touch), "exec"),
        "eval": (Payload(builtins.eval, touch), "eval"),
        "subprocess": (Payload(subprocess.call, ["touch", marker]), "subprocess"),
        "unknown __reduce__": (UnknownClassPayload(marker), "MarkerOnInit"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "eval", "subprocess", "unknown __reduce__"])
@pytest.mark.parametrize("placement", ["bare", "inside_snapshot"])
def test_code_payloads_are_refused(tmp_path, kind, placement):
    marker = str(tmp_path / "marker")
    payload, name = _payloads(marker)[kind]
    if placement == "bare":
        data = pickle.dumps(payload, protocol=4)
    else:
        data = snapshot_bytes(EDMPrecond(**TINY), dataset_kwargs={"path": payload})
    PermissiveUnpickler(io.BytesIO(data)).load()  # the payload is live under an unrestricted loader
    assert os.path.exists(marker)
    os.remove(marker)

    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(RefusedGlobalError) as err:
        load_denoiser("edm_pickle", path)
    message = str(err.value)
    assert "refused global" in message and name in message and "\n" not in message
    assert not os.path.exists(marker)


def test_module_src_is_never_executed(tmp_path):
    """A record is data: its embedded source (which EDM's loader execs) must not run."""
    marker = str(tmp_path / "marker")
    source = f"open({marker!r}, 'w').close()\nclass EDMPrecond: pass\n"
    record = persistent_record("EDMPrecond", {"_init_kwargs": dict(TINY)}, module_src=source)
    path = tmp_path / "record.pkl"
    path.write_bytes(dumps({"ema": record}))
    with pytest.raises(CheckpointError, match="missing"):
        load_denoiser("edm_pickle", path)
    assert not os.path.exists(marker)
    assert "torch_utils" not in sys.modules and not any(m.startswith("_imported_module_") for m in sys.modules)


def test_storage_blob_payload_is_refused(tmp_path):
    """Storage blobs go through torch's weights-only reader; a blob carrying a pickle payload is rejected."""
    marker = str(tmp_path / "marker")
    blob = pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)
    data = pickle.dumps(Payload(torch.storage._load_from_bytes, blob), protocol=4)
    with pytest.raises(RuntimeError, match="magic number"):
        pickle.loads(data)  # torch's own _load_from_bytes is not weights-only: it runs the payload, then complains
    assert os.path.exists(marker)
    os.remove(marker)
    (tmp_path / "blob.pkl").write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_denoiser("edm_pickle", tmp_path / "blob.pkl")
    assert "\n" not in str(err.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("target", [b"ctorch._utils\n_rebuild_parameter\n", b"ctorch.nn.modules.container\nModuleDict\n"])
def test_build_on_allowed_globals_is_refused(tmp_path, target):
    """BUILD straight onto an allowed global would set attributes on our stand-ins; it must fail instead."""
    state = pickle.dumps((None, {"__setstate__": 1, "__call__": 2}), protocol=2)[2:-1]
    (tmp_path / "build.pkl").write_bytes(b"\x80\x02" + target + state + b"b.")
    with pytest.raises(CheckpointError):
        load_denoiser("edm_pickle", tmp_path / "build.pkl")
    assert "__call__" not in vars(ModuleDictRecord) and callable(vars(ModuleDictRecord)["__setstate__"])
    weight = torch.ones(2)
    assert ALLOWED_GLOBALS[("torch._utils", "_rebuild_parameter")](weight, False, {}) is weight


def test_truncated_file(tmp_path):
    data = fixture_path("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.pkl").read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 100):
        path = tmp_path / "cut.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_denoiser("edm_pickle", path)
        assert "\n" not in str(err.value) and "cut.pkl" in str(err.value)


def test_random_bytes(tmp_path):
    rng = random.Random(0)
    for i in range(20):
        body = rng.randbytes(rng.randint(1, 4096))
        path = tmp_path / f"random{i}.pkl"
        # Half the files start with a pickle protocol header so the unpickler itself meets the garbage.
        path.write_bytes((b"\x80\x04" if i % 2 else b"") + body)
        with pytest.raises(CheckpointError) as err:
            load_denoiser("edm_pickle", path)
        assert "\n" not in str(err.value)


def test_wrong_formats(tmp_path):
    zipped = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(CheckpointError, match="zip archive"):
        load_denoiser("edm_pickle", zipped)
    plain = tmp_path / "list.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(CheckpointError, match="expected an EDM snapshot dict"):
        load_denoiser("edm_pickle", plain)
    nokey = tmp_path / "nokey.pkl"
    nokey.write_bytes(pickle.dumps({"net": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        load_denoiser("edm_pickle", nokey)
    text = tmp_path / "text.pkl"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a pickle"):
        load_denoiser("edm_pickle", text)


def test_pickle_header_check_reads_no_more_than_the_file(tmp_path):
    """A length field claiming gigabytes must not make the reader allocate them."""
    path = tmp_path / "huge.pkl"
    path.write_bytes(b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc")  # BINBYTES8 of 1 TiB
    with pytest.raises(CheckpointError):
        load_denoiser("edm_pickle", path)
