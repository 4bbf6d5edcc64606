"""NVIDIA EDM network pickles read without executing anything from the file.

An EDM snapshot (`checkpoints.md` §2–§4) is a plain protocol-4 pickle whose networks are persistent-object records
`torch_utils.persistence._reconstruct_persistent_obj(meta)`; `meta` carries the class name, the object's `__dict__`
(with `_init_kwargs`) and the full source of the defining module, which EDM's own loader `exec`s. Here a restricted
unpickler resolves only the globals on `ALLOWED_GLOBALS` and maps each to a data-only stand-in: the record becomes a
`PersistentRecord` (the source text is dropped unread), tensor storages are decoded from their legacy `torch.save`
blobs by a second restricted unpickler, numpy scalars from their bytes without numpy. Any other global is refused
with `RefusedGlobalError` naming it.

The file is untrusted in size and shape too: every unpickler here has a budget of pickle operations (which bounds
the memory and the size of every container it can build), a bound on how deep tuples may nest while keys are being
hashed, and the finished object is checked for nesting depth and cycles before anything else looks at it. A storage
blob must hold exactly the elements its header claims and a tensor record may only address elements its storage
holds, so nothing is allocated on a file's say-so beyond the bytes the file contains. The network is then rebuilt from our own classes (`dode_lightning.networks`) from the stored init kwargs
(class defaults fill absent keys) and the recovered state dict is loaded with `strict=True`.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import itertools
import math
import os
import pickle
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..networks.precond import PRECONDITIONERS
from .errors import CheckpointError, RefusedGlobalError, one_line, quoted, state_dict_mismatch

__all__ = [
    "ALLOWED_GLOBALS",
    "PersistentRecord",
    "ModuleDictRecord",
    "read_snapshot",
    "recover_state_dict",
    "build_network",
    "load_edm_network",
    "LEGACY_STORAGE_MAGIC",
    "LEGACY_STORAGE_PROTOCOL",
    "MAX_PICKLE_OPERATIONS",
    "MAX_NESTING",
]

PERSISTENCE_VERSION = 6
_PICKLE_PROTO = 0x80
MAX_PICKLE_OPERATIONS = 1 << 19
"""Budget of pickle operations per snapshot: 524 288. The tiny fixture (121 layers) takes 24 k, full-size
snapshots in the layouts of the largest EDM releases (FFHQ DDPM++, ImageNet ADM, ~320 layers) about 60 k. Each
operation creates at most one small object, so the budget also bounds every container's size and what a crafted
file can make the unpickler allocate besides its own bytes (docs/hostile_checkpoints.md)."""
MAX_NESTING = 100
"""Deepest container nesting accepted; the EDM fixture nests 18 levels (snapshot → record state → _modules → …)."""
MAX_TENSOR_DIMS = 64
MAX_INIT_INTEGER = 1 << 16
"""Largest integer accepted in a network's stored constructor arguments (they size loops and layer counts); EDM's
own settings are all below 10⁴ (M = 1000, max_positions = 10000, label_dim = 1000)."""
MAX_INIT_LIST = 64
LEGACY_STORAGE_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_STORAGE_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
"""The `torch.<Name>Storage` classes a legacy storage blob may name, by the dtype of their elements."""


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
        raise pickle.UnpicklingError(f"refused to set attribute {quoted(name)} on {cls.__name__}")


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
        raise pickle.UnpicklingError(f"numpy scalar of unsupported dtype {quoted(dtype.code)}")
    order = ">" if dtype.byte_order == ">" else "<"
    (value,) = struct.unpack(order + code, data)
    return value


def _charged(operation: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(unpickler: "_BoundedUnpickler") -> None:
        unpickler._charge()
        operation(unpickler)

    return run


def _nesting_tracked(operation: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(unpickler: "_BoundedUnpickler") -> None:
        operation(unpickler)
        unpickler._track_nesting(unpickler.stack[-1])

    return run


class _BoundedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler with bounds, resolving only the globals in `allowed`.

    Its memo is a dict, so a corrupt memo index cannot force a huge allocation. Every operation is charged to a
    budget of `max_operations`. Tuples and frozensets may not nest deeper than MAX_NESTING: they are what gets
    hashed when a dict or set key is inserted, and hashing recurses in C (a key nested 10⁶ deep overflows the C
    stack). Other containers are only checked once complete (`_check_nesting`), since they can still grow.
    """

    allowed: Mapping[tuple[str, str], Any] = types.MappingProxyType({})
    max_operations = MAX_PICKLE_OPERATIONS
    dispatch = {code: _charged(operation) for code, operation in pickle._Unpickler.dispatch.items()}
    for _opcode in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET):
        dispatch[_opcode[0]] = _charged(_nesting_tracked(pickle._Unpickler.dispatch[_opcode[0]]))
    del _opcode

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._operations_left = self.max_operations
        # id → (the object, kept alive so that no other object can take its id, its tuple nesting depth)
        self._hashable_depth: dict[int, tuple[Any, int]] = {}

    def _charge(self) -> None:
        self._operations_left -= 1
        if self._operations_left < 0:
            raise CheckpointError(f"more than {self.max_operations:,} pickle operations, far more than an EDM network pickle holds")

    def _track_nesting(self, made: tuple | frozenset) -> None:
        depth = 1 + max((self._hashable_depth.get(id(item), (None, 0))[1] for item in made), default=0)
        if depth > MAX_NESTING:
            raise CheckpointError(f"tuples nested more than {MAX_NESTING} deep, which no EDM network pickle holds")
        self._hashable_depth[id(made)] = (made, depth)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"refused global {quoted(f'{module}.{name}')}: not on the EDM network-pickle allow-list") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in EDM network pickles")


@dataclass(frozen=True)
class _StorageClaim:
    """The persistent id of a legacy storage blob: what its header says the raw data that follows holds."""

    dtype: torch.dtype
    key: str
    numel: int


class _StorageHeaderUnpickler(_BoundedUnpickler):
    """Reads one of the small pickles at the head of a legacy storage blob; the storage's persistent id
    ('storage', torch.<Name>Storage, key, location, numel, None) becomes a `_StorageClaim`."""

    allowed = types.MappingProxyType({("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()})
    max_operations = 1 << 12  # torch writes a few dozen

    def persistent_load(self, pid: Any) -> _StorageClaim:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0 and pid[5] is None):
            raise CheckpointError("a storage blob names its storage in an unsupported way")
        return _StorageClaim(pid[1], pid[2], pid[4])


@dataclass(frozen=True)
class _Storage:
    """A storage read from a blob: its elements as one flat tensor (of exactly the bytes the blob held)."""

    elements: Tensor


def _read_storage_blob(data: bytes) -> _Storage:
    """torch.storage._load_from_bytes for the stream `Storage.__reduce__` writes (checkpoints.md §4).

    That stream is always legacy `torch.save` (`_use_new_zipfile_serialization=False`): five small pickles (magic
    number, protocol, system info, the storage's persistent id, its key), then int64 numel and numel raw
    little-endian elements. A zip blob, the only kind torch.load would decompress (a zip bomb's way in), is refused
    unread; the raw data must be exactly as long as the header claims, so nothing is allocated beyond the bytes given.
    """
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("storage payload is not bytes")
    if data.startswith(b"PK"):
        raise CheckpointError("a storage blob is a zip archive; EDM network pickles hold uncompressed legacy storages")
    stream = io.BytesIO(data)
    magic, protocol, system, claim, keys = (_StorageHeaderUnpickler(stream).load() for _ in range(5))
    if type(magic) is not int or magic != LEGACY_STORAGE_MAGIC or type(protocol) is not int or protocol != LEGACY_STORAGE_PROTOCOL:
        raise CheckpointError("a storage blob is not a legacy torch.save storage stream")
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise CheckpointError("a storage blob is not little-endian")
    if not isinstance(claim, _StorageClaim) or keys != [claim.key]:
        raise CheckpointError("a storage blob does not hold exactly one storage")
    count = stream.read(8)
    start, itemsize = stream.tell(), claim.dtype.itemsize
    held = (len(data) - start) // itemsize
    if len(count) != 8 or int.from_bytes(count, "little", signed=True) != claim.numel or held * itemsize != len(data) - start or held != claim.numel:
        raise CheckpointError(f"a storage blob claims {quoted(claim.numel)} elements of {claim.dtype} but holds {held}")
    if not held:
        return _Storage(torch.empty(0, dtype=claim.dtype))
    return _Storage(torch.frombuffer(bytearray(memoryview(data)[start:]), dtype=claim.dtype))


def _check_no_hooks(hooks: Any) -> None:
    if not isinstance(hooks, dict) or hooks:
        raise pickle.UnpicklingError("tensor backward hooks are not supported")


def _check_geometry(held: int, offset: Any, size: Any, stride: Any) -> None:
    """A tensor record may address only elements its storage holds, and claim no more elements than that: torch's
    `set_` would grow the storage with uninitialised memory, and a stride-0 view would allocate on its first copy."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_TENSOR_DIMS):
        raise CheckpointError("a tensor record has a malformed size or stride")
    if not all(type(v) is int and 0 <= v < 1 << 63 for v in (offset, *size, *stride)):
        raise CheckpointError("a tensor record has a size, stride or offset that is not a non-negative 64-bit integer")
    count = math.prod(size)
    extent = offset + 1 + sum((n - 1) * step for n, step in zip(size, stride)) if count else offset
    if count > held or extent > held:
        raise CheckpointError(f"a tensor record claims {quoted(count)} elements up to index {quoted(extent - 1)}, but its storage holds {held}")


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Any, metadata: Any = None) -> Tensor:
    """torch._utils._rebuild_tensor_v2 for a storage read from a blob: a view of elements the storage holds."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    _check_no_hooks(hooks)
    if metadata is not None:
        raise pickle.UnpicklingError("tensor metadata is not supported")
    _check_geometry(storage.elements.numel(), offset, size, stride)
    return storage.elements.as_strided(size, stride, offset)


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
        raise pickle.UnpicklingError(f"persistence version {quoted(meta.get('version'))}, expected {PERSISTENCE_VERSION}")
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
    ("torch.storage", "_load_from_bytes"): _Allowed(_read_storage_blob),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _Allowed(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _Allowed(_numpy_scalar),
}
"""Every global an EDM snapshot needs (checkpoints.md §4), old (`numpy.core`) and new (`numpy._core`) names."""


_DROPPED_BLOB = object()
"""Memo stand-in for a large bytes object; it fails every type check if a file refers back to it."""


class _RestrictedUnpickler(_BoundedUnpickler):
    """The snapshot's unpickler: the EDM allow-list, and storage blobs kept out of the memo."""

    allowed = types.MappingProxyType(ALLOWED_GLOBALS)
    dispatch = dict(_BoundedUnpickler.dispatch)

    def load_memoize(self) -> None:
        # Each storage blob is used once, by _load_from_bytes. Memoising the bytes (or the 1-tuple of arguments
        # holding them) would keep a second copy of every weight alive until the end of the load.
        top = self.stack[-1]
        blob = top[0] if isinstance(top, tuple) and len(top) == 1 else top
        self.memo[len(self.memo)] = _DROPPED_BLOB if isinstance(blob, bytes) and len(blob) > 4096 else top

    dispatch[pickle.MEMOIZE[0]] = _charged(load_memoize)


_CONTAINERS = (dict, list, tuple, set, frozenset, PersistentRecord, ModuleDictRecord)
_END = object()


def _members(node: Any) -> Iterable[Any]:
    """What an unpickled container refers to; a record refers to its state."""
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (PersistentRecord, ModuleDictRecord)):
        return (node.state,)
    return node if isinstance(node, _CONTAINERS) else ()


def _check_nesting(root: Any) -> None:
    """Refuse an unpickled object nested more than MAX_NESTING deep or containing itself, before anything (a repr,
    a comparison, our own tree walk) recurses into it. Iterative; each container is visited once, and one reached
    again by another path counts with the height found the first time."""
    too_deep = CheckpointError(f"containers nested more than {MAX_NESTING} deep, which no EDM network pickle holds")
    height: dict[int, int] = {}  # finished containers: levels from it down to its deepest member
    on_path = {id(root)}
    path = [[root, iter(_members(root)), 0]]  # container, its members still to visit, tallest member so far
    while path:
        entry = path[-1]
        member = next((m for m in entry[1] if isinstance(m, _CONTAINERS)), _END)
        if member is _END:
            path.pop()
            on_path.discard(id(entry[0]))
            height[id(entry[0])] = entry[2] + 1
            if path:
                path[-1][2] = max(path[-1][2], entry[2] + 1)
        elif id(member) in on_path:
            raise CheckpointError("a container contains itself, which no EDM network pickle does")
        elif id(member) in height:
            if len(path) + height[id(member)] > MAX_NESTING:
                raise too_deep
            entry[2] = max(entry[2], height[id(member)])
        else:
            if len(path) >= MAX_NESTING:
                raise too_deep
            on_path.add(id(member))
            path.append([member, iter(_members(member)), 0])


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
            _check_nesting(snapshot)
        except CheckpointError as err:
            raise type(err)(f"{path.name}: {err}") from None
        except MemoryError:
            raise
        except Exception as err:  # any malformed input ends here as one clean error
            raise CheckpointError(f"{path.name}: unreadable EDM network pickle ({type(err).__name__}: {one_line(err)})") from None
        reader.drain()
    return snapshot, reader.digest.hexdigest()


def _named_entries(table: dict, prefix: str, kind: str) -> list[tuple[str, Any]]:
    names = [name for name in table if not isinstance(name, str)]
    if names:
        raise CheckpointError(f"module {quoted(prefix or '<root>')} has a {kind} named {quoted(names[0])}, not a string")
    return list(table.items())


def _collect(node: Any, prefix: str, out: dict[str, Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("module tree deeper than 64 levels")
    state = node.state
    tables = [state.get("_parameters", {}), state.get("_buffers", {}), state.get("_modules", {})]
    skip = state.get("_non_persistent_buffers_set", set())
    if not all(isinstance(t, dict) for t in tables) or not isinstance(skip, (set, frozenset)):
        raise CheckpointError(f"module {quoted(prefix or '<root>')} has malformed _parameters/_buffers/_non_persistent_buffers_set/_modules")
    params = _named_entries(tables[0], prefix, "parameter")
    buffers = [(n, v) for n, v in _named_entries(tables[1], prefix, "buffer") if n not in skip]
    for name, value in [*params, *buffers]:
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{quoted(prefix + name)} is {quoted(value)}, expected a tensor")
        out[prefix + name] = value
    for name, child in _named_entries(tables[2], prefix, "submodule"):
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleDictRecord)):
            raise CheckpointError(f"submodule {quoted(prefix + name)} is {quoted(child)}, not a network record")
        _collect(child, f"{prefix}{name}.", out, depth + 1)


def recover_state_dict(record: PersistentRecord) -> dict[str, Tensor]:
    """The network's `state_dict()` from its record: `_parameters`, persistent `_buffers`, then `_modules`, dotted."""
    out: dict[str, Tensor] = {}
    _collect(record, "", out)
    return out


def _check_init_values(value: Any, name: str) -> None:
    """Bound the integers and lists in the stored constructor arguments before they size anything."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INIT_INTEGER:
        raise CheckpointError(f"stored init argument {quoted(name)} is {quoted(value)}; EDM networks use integers up to {MAX_INIT_INTEGER}")
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_INIT_LIST:
            raise CheckpointError(f"stored init argument {quoted(name)} has {len(value)} entries; at most {MAX_INIT_LIST}")
        for item in value:
            _check_init_values(item, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_init_values(item, f"{name}.{key}" if isinstance(key, str) else name)


@contextlib.contextmanager
def _registration_budget(limit: int) -> Iterator[None]:
    """Refuse a network whose constructor registers more than `limit` layers, parameters and buffers: the stored
    init kwargs could describe a network far larger than the weights the file holds (num_blocks = 10⁹ would build
    for hours), and such a network could not match those weights anyway."""
    registered = 0

    def charge(*_: Any) -> None:
        nonlocal registered
        registered += 1
        if registered > limit:
            raise CheckpointError(f"the init kwargs describe a network with more than {limit} layers, parameters and buffers, far more than the file's weights")

    hooks = nn.modules.module
    handles = [hooks.register_module_module_registration_hook(charge), hooks.register_module_parameter_registration_hook(charge),
               hooks.register_module_buffer_registration_hook(charge)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_network(record: PersistentRecord) -> nn.Module:
    """Rebuild the preconditioned network from its init kwargs and load the recovered weights strictly.

    The module is built on the meta device and the file's tensors are assigned, so the weights are held once.
    Returned in eval mode, float32, with requires_grad off.
    """
    cls = PRECONDITIONERS.get(record.class_name)
    if cls is None:
        raise CheckpointError(f"network class {quoted(record.class_name)} is not one of {', '.join(PRECONDITIONERS)}")
    state_dict = recover_state_dict(record)
    try:
        _check_init_values(list(record.init_args), "_init_args")
        for name, value in record.init_kwargs.items():
            _check_init_values(value, name)
        # Each stored tensor is one parameter or buffer of a layer: 4 registrations per tensor leave ample room.
        with torch.device("meta"), _registration_budget(4 * len(state_dict) + 256):
            net = cls(*record.init_args, **record.init_kwargs)
    except Exception as err:  # the kwargs come from the file: any failure to build is the file's fault
        raise CheckpointError(f"cannot rebuild {record.class_name} from the stored init kwargs: {one_line(err)}") from None
    mismatch = state_dict_mismatch(net.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{record.class_name} weights do not match the network its init kwargs describe: {mismatch}")
    not_float = [name for name, tensor in state_dict.items() if not tensor.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{len(not_float)} non-floating-point weight tensors (first {quoted(not_float[0])})")
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
        keys = ", ".join(quoted(k) for k in itertools.islice(snapshot, 8)) + (", …" if len(snapshot) > 8 else "")
        raise CheckpointError(f"{name}: no {quoted(key)} entry (keys: {keys})")
    record = snapshot[key]
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{name}: {key!r} is a {type(record).__name__}, not a persistent network record")
    try:
        return build_network(record), digest
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
