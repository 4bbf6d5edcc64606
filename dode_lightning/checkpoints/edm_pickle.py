"""NVIDIA EDM network pickles read without executing anything from the file.

An EDM snapshot (`checkpoints.md` §2–§4) is a plain protocol-4 pickle whose networks are persistent-object records
`torch_utils.persistence._reconstruct_persistent_obj(meta)`; `meta` carries the class name, the object's `__dict__`
(with `_init_kwargs`) and the full source of the defining module, which EDM's own loader `exec`s. Here a restricted
unpickler resolves only the globals on `ALLOWED_GLOBALS` and maps each to a data-only stand-in: the record becomes a
`PersistentRecord` (the source text is dropped unread), tensor storages are read by `torch.load(weights_only=True)`,
numpy scalars are decoded from their bytes without numpy. Any other global is refused with `RefusedGlobalError`
naming it. The network is then rebuilt from our own classes (`dode_lightning.networks`) from the stored init kwargs
(class defaults fill absent keys) and the recovered state dict is loaded with `strict=True`.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..networks.precond import PRECONDITIONERS
from .errors import CheckpointError, RefusedGlobalError, one_line, state_dict_mismatch

__all__ = [
    "ALLOWED_GLOBALS",
    "PersistentRecord",
    "ModuleDictRecord",
    "read_snapshot",
    "recover_state_dict",
    "build_network",
    "load_edm_network",
]

PERSISTENCE_VERSION = 6
_PICKLE_PROTO = 0x80


@dataclass
class PersistentRecord:
    """What `_reconstruct_persistent_obj(meta)` would have rebuilt, as data: class name and the object's state."""

    class_name: str
    state: dict = field(repr=False)

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args", ()))

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs", {}))


class _FrozenClass(type):
    """Metaclass refusing attribute writes, so a pickle BUILD cannot rewire the stand-in classes."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set attribute {name!r} on {cls.__name__}")


class ModuleDictRecord(metaclass=_FrozenClass):
    """Stand-in for `torch.nn.ModuleDict`: keeps the `__dict__` that BUILD hands to `__setstate__`."""

    state: Mapping[str, Any] = types.MappingProxyType({})  # until BUILD provides one

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("ModuleDict state is not a dict")
        self.state = state


class _NumpyDtype(metaclass=_FrozenClass):
    """Stand-in for `numpy.dtype(code, align, copy)`: keeps the type code and, from BUILD, the byte order."""

    def __init__(self, code: str, align: bool = False, copy: bool = False) -> None:
        if not isinstance(code, str):
            raise pickle.UnpicklingError("numpy dtype code is not a string")
        self.code = code
        self.byte_order = "<"

    def __setstate__(self, state: tuple) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("unsupported numpy dtype state")
        self.byte_order = state[1]


_STRUCT_CODES = {
    "f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
    "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?",
}


def _numpy_scalar(dtype: _NumpyDtype, data: bytes) -> float | int | bool:
    """numpy.core.multiarray.scalar(dtype, bytes) for plain numeric dtypes, returned as a Python number."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with an unsupported payload")
    code = _STRUCT_CODES.get(dtype.code)
    if code is None:
        raise pickle.UnpicklingError(f"numpy scalar of unsupported dtype {dtype.code!r}")
    order = ">" if dtype.byte_order == ">" else "<"
    (value,) = struct.unpack(order + code, data)
    return value


def _load_storage(data: bytes) -> Any:
    """torch.storage._load_from_bytes, through torch's weights-only unpickler."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("storage payload is not bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("storage payload did not hold a storage")
    return storage


def _check_no_hooks(hooks: Any) -> None:
    if not isinstance(hooks, dict) or hooks:
        raise pickle.UnpicklingError("tensor backward hooks are not supported")


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Any, metadata: Any = None) -> Tensor:
    """torch._utils._rebuild_tensor_v2 for a CPU storage; set_ bounds-checks size/stride against the storage."""
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("tensor without a typed storage")
    if not isinstance(offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
        raise pickle.UnpicklingError("tensor geometry is not integral")
    _check_no_hooks(hooks)
    if metadata is not None:
        raise pickle.UnpicklingError("tensor metadata is not supported")
    tensor = torch.empty(0, dtype=storage.dtype)
    return tensor.set_(storage._untyped_storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Tensor, requires_grad: bool, hooks: Any) -> Tensor:
    """torch._utils._rebuild_parameter; the plain tensor is enough, parameters are re-created at load."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    _check_no_hooks(hooks)
    return data


def _reconstruct_record(meta: dict) -> PersistentRecord:
    """torch_utils.persistence._reconstruct_persistent_obj, minus the exec: `module_src` is never looked at."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("persistent-object record of unknown type")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(f"persistence version {meta.get('version')!r}, expected {PERSISTENCE_VERSION}")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("persistent-object record without class name or state")
    return PersistentRecord(class_name, state)


class _Allowed:
    """An allow-listed callable; BUILD on it is refused (it would otherwise set attributes on our functions)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("refused BUILD on an allow-listed global")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Allowed(_reconstruct_record),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor),
    ("torch.storage", "_load_from_bytes"): _Allowed(_load_storage),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _Allowed(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _Allowed(_numpy_scalar),
}
"""Every global an EDM snapshot needs (checkpoints.md §4), old (`numpy.core`) and new (`numpy._core`) names."""


_DROPPED_BLOB = object()
"""Memo stand-in for a large bytes object; it fails every type check if a file refers back to it."""


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler: its memo is a dict, so a corrupt memo index cannot force a huge allocation."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_memoize(self) -> None:
        # Each storage blob is used once, by _load_from_bytes. Memoising the bytes (or the 1-tuple of arguments
        # holding them) would keep a second copy of every weight alive until the end of the load.
        top = self.stack[-1]
        blob = top[0] if isinstance(top, tuple) and len(top) == 1 else top
        self.memo[len(self.memo)] = _DROPPED_BLOB if isinstance(blob, bytes) and len(blob) > 4096 else top

    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"refused global '{module}.{name}': not on the EDM network-pickle allow-list") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in EDM network pickles")


class _HashingReader:
    """Read-only view of a file for the unpickler: hashes what passes through, and clamps every read to the bytes
    left, so a corrupt length field cannot make it allocate more than the file size."""

    def __init__(self, raw: io.BufferedReader, size: int) -> None:
        self._raw, self._remaining = raw, size
        self.digest = hashlib.sha256()

    def _take(self, data: bytes) -> bytes:
        self.digest.update(data)
        self._remaining -= len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self._raw.read(self._remaining if n is None or n < 0 else min(n, self._remaining)))

    def readline(self) -> bytes:
        return self._take(self._raw.readline(self._remaining))

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self._remaining]
        count = self._raw.readinto(view)
        self._take(bytes(view[:count]))
        return count

    def drain(self) -> None:
        while self._remaining and self.read(1 << 20):
            pass


def read_snapshot(path: str | os.PathLike) -> tuple[Any, str]:
    """Unpickle an EDM snapshot with the restricted unpickler: (the snapshot object, sha256 of the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as raw:
        head = raw.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{path.name}: a zip archive (torch.save format?), not an EDM network pickle")
        if not head or head[0] != _PICKLE_PROTO:
            raise CheckpointError(f"{path.name}: not a pickle (no protocol header), so not an EDM network pickle")
        raw.seek(0)
        reader = _HashingReader(raw, size)
        try:
            snapshot = _RestrictedUnpickler(reader).load()
        except RefusedGlobalError as err:
            raise RefusedGlobalError(f"{path.name}: {err}") from None
        except MemoryError:
            raise
        except Exception as err:  # any malformed input ends here as one clean error
            raise CheckpointError(f"{path.name}: unreadable EDM network pickle ({type(err).__name__}: {one_line(err)})") from None
        reader.drain()
    return snapshot, reader.digest.hexdigest()


def _collect(node: Any, prefix: str, out: dict[str, Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("module tree deeper than 64 levels")
    state = node.state
    tables = [state.get("_parameters", {}), state.get("_buffers", {}), state.get("_modules", {})]
    if not all(isinstance(t, dict) for t in tables):
        raise CheckpointError(f"module {prefix or '<root>'} has malformed _parameters/_buffers/_modules")
    params, buffers, modules = tables
    skip = state.get("_non_persistent_buffers_set", set())
    for name, value in [*params.items(), *((n, v) for n, v in buffers.items() if n not in skip)]:
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, expected a tensor")
        out[prefix + name] = value
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleDictRecord)):
            raise CheckpointError(f"submodule {prefix}{name} is a {type(child).__name__}, not a network record")
        _collect(child, f"{prefix}{name}.", out, depth + 1)


def recover_state_dict(record: PersistentRecord) -> dict[str, Tensor]:
    """The network's `state_dict()` from its record: `_parameters`, persistent `_buffers`, then `_modules`, dotted."""
    out: dict[str, Tensor] = {}
    _collect(record, "", out)
    return out


def build_network(record: PersistentRecord) -> nn.Module:
    """Rebuild the preconditioned network from its init kwargs and load the recovered weights strictly.

    The module is built on the meta device and the file's tensors are assigned, so the weights are held once.
    Returned in eval mode, float32, with requires_grad off.
    """
    cls = PRECONDITIONERS.get(record.class_name)
    if cls is None:
        raise CheckpointError(f"network class {record.class_name!r} is not one of {', '.join(PRECONDITIONERS)}")
    state_dict = recover_state_dict(record)
    try:
        with torch.device("meta"):
            net = cls(*record.init_args, **record.init_kwargs)
    except Exception as err:  # the kwargs come from the file: any failure to build is the file's fault
        raise CheckpointError(f"cannot rebuild {record.class_name} from the stored init kwargs: {one_line(err)}") from None
    mismatch = state_dict_mismatch(net.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{record.class_name} weights do not match the network its init kwargs describe: {mismatch}")
    not_float = [name for name, tensor in state_dict.items() if not tensor.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{len(not_float)} non-floating-point weight tensors (first {not_float[0]})")
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"cannot load the weights into {record.class_name}: {one_line(err)}") from None
    return net.float().eval().requires_grad_(False)


def load_edm_network(path: str | os.PathLike, key: str = "ema") -> tuple[nn.Module, str]:
    """Read an EDM snapshot and rebuild `snapshot[key]`: (network, sha256 of the file)."""
    snapshot, digest = read_snapshot(path)
    name = Path(path).name
    if not isinstance(snapshot, dict):
        raise CheckpointError(f"{name}: holds a {type(snapshot).__name__}, expected an EDM snapshot dict")
    if key not in snapshot:
        raise CheckpointError(f"{name}: no {key!r} entry (keys: {', '.join(map(str, snapshot))})")
    record = snapshot[key]
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{name}: {key!r} is a {type(record).__name__}, not a persistent network record")
    try:
        return build_network(record), digest
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
