"""Writes EDM-format network snapshots from our own networks (test and benchmark helper).

The output has the layout of `checkpoints.md` §2–§4: a protocol-4 pickle of {ema, loss_fn, augment_pipe,
dataset_kwargs}, every EDM layer a persistent-object record `torch_utils.persistence._reconstruct_persistent_obj(meta)`
with the `nn.Module` `__dict__` fields, class attributes, `_init_args`/`_init_kwargs`, `enc`/`dec` as
`torch.nn.ModuleDict` (NEWOBJ + BUILD), tensors through torch's own `_rebuild_parameter`/`_rebuild_tensor_v2`/
`_load_from_bytes`, and `skip_scale` as a numpy float64 as EDM stores it. Two deliberate differences: `module_src`
is a placeholder comment (NVIDIA's source is not ours to ship, and no reader should run it — EDM's own loader
therefore cannot open these files), and layer records carry their attributes as `_init_kwargs` (readers rebuild
only from the top-level network's init kwargs).

`legacy_storage_blob`, `StoredTensor` and `deflated_zip_blob` write single tensor records and storage blobs with
claims under the caller's control, for the reader's tests and benchmarks with crafted files.
"""
from __future__ import annotations

import collections
import inspect
import io
import os
import pickle
import struct
import types
import zipfile
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..networks import edm as edm_layers
from ..networks.precond import PRECONDITIONERS
from .edm_pickle import LEGACY_STORAGE_MAGIC, LEGACY_STORAGE_PROTOCOL

__all__ = [
    "PLACEHOLDER_SOURCE", "persistent_record", "network_record", "dumps", "snapshot_bytes", "write_edm_snapshot",
    "legacy_storage_blob", "StoredTensor", "deflated_zip_blob",
]

PLACEHOLDER_SOURCE = "# training/networks.py placeholder written by dode_lightning.checkpoints.edm_writer; never executed\n"
_LOSS_SOURCE = "# training/loss.py placeholder written by dode_lightning.checkpoints.edm_writer; never executed\n"
_EDM_CLASSES = {*PRECONDITIONERS, *edm_layers.__all__}
_LOSSES = {"EDMPrecond": ("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
           "VPPrecond": ("VPLoss", dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)),
           "VEPrecond": ("VELoss", dict(sigma_min=0.02, sigma_max=100)),
           "iDDPMPrecond": ("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))}
_HOOK_FIELDS = (
    "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Marker for the global EDM's loader calls; the writer emits its name and never calls it."""
    raise RuntimeError("write-only marker")


class _Record:
    """Pickles as `torch_utils.persistence._reconstruct_persistent_obj(meta)`."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta

    def __reduce__(self) -> tuple:
        return _reconstruct_persistent_obj, (self.meta,)


class _ModuleDictState:
    """Pickles as a `torch.nn.ModuleDict` created by NEWOBJ and filled by BUILD, as pickle does for the real one."""

    def __init__(self, state: dict) -> None:
        self.state = state


class _SnapshotPickler(pickle._Pickler):
    """The pure-Python pickler with two EDM-specific writes: the persistence global by name (its module is not
    importable here) and ModuleDict containers whose children are records rather than modules."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _reconstruct_persistent_obj:
            self.save("torch_utils.persistence")
            self.save("_reconstruct_persistent_obj")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def _save_module_dict(self, obj: _ModuleDictState) -> None:
        self.save(nn.ModuleDict)
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    # The base dispatch table holds the base class's save_global for functions; route them to ours.
    dispatch[types.FunctionType] = save_global
    dispatch[_ModuleDictState] = _save_module_dict


def persistent_record(class_name: str, state: dict, module_src: str = PLACEHOLDER_SOURCE) -> _Record:
    """A persistent-object record (version 6) for any class name and state; tests use it for crafted records."""
    return _Record(dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _torch_fields(module: nn.Module, module_src: str) -> dict:
    """The nn.Module part of `__dict__` as torch 2.x pickles it, children turned into records."""
    state: dict[str, Any] = {"training": False}
    state["_parameters"] = {n: None if p is None else nn.Parameter(p.detach(), requires_grad=False) for n, p in module._parameters.items()}
    state["_buffers"] = {n: None if b is None else b.detach() for n, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    for hook_field in _HOOK_FIELDS:
        state[hook_field] = collections.OrderedDict()
    state["_is_full_backward_hook"] = None
    state["_modules"] = {name: None if child is None else _child(child, module_src) for name, child in module._modules.items()}
    return state


def _child(module: nn.Module, module_src: str) -> Any:
    if type(module) is nn.ModuleDict:
        return _ModuleDictState(_torch_fields(module, module_src))
    return network_record(module, module_src)


def _attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in ("training", "init_kwargs") and _plain(v)}


def network_record(module: nn.Module, module_src: str = PLACEHOLDER_SOURCE, init_kwargs: dict | None = None) -> _Record:
    """The persistent-object record tree of one of our EDM modules (preconditioner, U-Net or layer)."""
    class_name = type(module).__name__
    if class_name not in _EDM_CLASSES:
        raise TypeError(f"{class_name} is not an EDM network class")
    state = _torch_fields(module, module_src)
    state.update({k: np.float64(v) if k == "skip_scale" else v for k, v in _attributes(module).items()})
    if init_kwargs is None:
        init_kwargs = dict(module.init_kwargs) if hasattr(module, "init_kwargs") else _attributes(module)
    if isinstance(module, tuple(PRECONDITIONERS.values())):
        # The inner U-Net's kwargs: what the preconditioner passes on (EDM stores them on the U-Net record).
        own = set(inspect.signature(type(module).__init__).parameters)
        inner = dict(img_resolution=module.img_resolution, in_channels=module.img_channels,
                     out_channels=module.img_channels * module.output_channel_factor, label_dim=module.label_dim,
                     **{k: v for k, v in init_kwargs.items() if k not in own})
        state["_modules"]["model"] = network_record(module.model, module_src, inner)
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs
    return persistent_record(class_name, state, module_src)


def _dump(handle: Any, net: nn.Module, dataset_kwargs: dict | None, extra: dict | None) -> None:
    loss_name, loss_attrs = _LOSSES[type(net).__name__]
    if loss_name == "EDMLoss" and hasattr(net, "sigma_data"):
        # EDM trains with the preconditioner's own σ_data; record the value this network was built with.
        loss_attrs = {**loss_attrs, "sigma_data": float(net.sigma_data)}
    loss = persistent_record(loss_name, {**loss_attrs, "_init_args": (), "_init_kwargs": {}}, _LOSS_SOURCE)
    default_dataset = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/unknown.zip",
                           use_labels=bool(net.label_dim), xflip=False, cache=True, resolution=net.img_resolution, max_size=None)
    data = dict(ema=network_record(net), loss_fn=loss, augment_pipe=None, dataset_kwargs=dataset_kwargs or default_dataset)
    data.update(extra or {})
    _SnapshotPickler(handle, protocol=4).dump(data)


def dumps(obj: Any) -> bytes:
    """Pickle any tree of records (from `persistent_record`/`network_record`) the way EDM snapshots are pickled."""
    buffer = io.BytesIO()
    _SnapshotPickler(buffer, protocol=4).dump(obj)
    return buffer.getvalue()


def snapshot_bytes(net: nn.Module, dataset_kwargs: dict | None = None, extra: dict | None = None) -> bytes:
    """The bytes of an EDM snapshot {ema, loss_fn, augment_pipe, dataset_kwargs} holding `net` as `ema`;
    `extra` adds or replaces top-level entries."""
    buffer = io.BytesIO()
    _dump(buffer, net, dataset_kwargs, extra)
    return buffer.getvalue()


def write_edm_snapshot(path: str | os.PathLike, net: nn.Module, dataset_kwargs: dict | None = None, extra: dict | None = None) -> None:
    """Write `net` (one of our preconditioners) as an EDM-format snapshot file, streamed to disk."""
    with open(path, "wb") as handle:
        _dump(handle, net, dataset_kwargs, extra)


def legacy_storage_blob(values: Tensor, claimed: int | None = None, stored: int | None = None) -> bytes:
    """The stream `Storage.__reduce__` writes for a float32 storage holding `values` (checkpoints.md §4: magic
    number, protocol, system info, the persistent id, the key list, int64 numel, raw data). `claimed` replaces the
    numel in the persistent id and `stored` the one before the data."""
    numel = values.numel()
    storage = object()

    class Header(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple | None:
            return ("storage", torch.FloatStorage, "0", "cpu", numel if claimed is None else claimed, None) if obj is storage else None

    head = io.BytesIO()
    for part in (LEGACY_STORAGE_MAGIC, LEGACY_STORAGE_PROTOCOL, {"protocol_version": LEGACY_STORAGE_PROTOCOL, "little_endian": True}):
        pickle.dump(part, head, protocol=2)
    Header(head, protocol=2).dump(storage)
    pickle.dump(["0"], head, protocol=2)
    data = values.detach().to(torch.float32).contiguous().numpy().tobytes()
    return head.getvalue() + struct.pack("<q", numel if stored is None else stored) + data


class StoredTensor:
    """Pickles as torch's tensor record `_rebuild_tensor_v2(_load_from_bytes(blob), offset, size, stride, …)`, with
    the blob and the geometry as given."""

    def __init__(self, blob: bytes, size: tuple, stride: tuple, offset: int = 0) -> None:
        self.blob, self.geometry = blob, (offset, size, stride)

    def __reduce__(self) -> tuple:
        return torch._utils._rebuild_tensor_v2, (_StorageBlob(self.blob), *self.geometry, False, collections.OrderedDict())


class _StorageBlob:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> tuple:
        return torch.storage._load_from_bytes, (self.blob,)


def deflated_zip_blob(inflated_bytes: int) -> bytes:
    """torch.save's zip layout for a storage, its data member replaced by `inflated_bytes` of deflated zeros
    (deflate packs zeros about 1000:1): the zip bomb that `torch.load` would inflate in memory."""
    plain = io.BytesIO()
    torch.save(torch.zeros(1).untyped_storage(), plain)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain.getvalue())) as original, zipfile.ZipFile(out, "w") as bomb:
        for info in original.infolist():
            if not info.filename.endswith("/data/0"):
                bomb.writestr(info.filename, original.read(info))
                continue
            member = zipfile.ZipInfo(info.filename)
            member.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(member, "w", force_zip64=True) as handle:
                chunk = bytes(1 << 20)
                for _ in range(inflated_bytes >> 20):
                    handle.write(chunk)
    return out.getvalue()
