"""Sampling at scale: seeds → images through `trainer.predict`, with resumable, atomic output on disk.

The math is two plain functions (`sample_seeds`, `to_uint8`); the rest wires them to Lightning:

* `SeedData` — a dataset of seeds. Under DDP Lightning's predict loop shards it with an unrepeated distributed
  sampler (rank r gets items r, r + W, …; no padding), so every seed belongs to exactly one rank.
* `DODESampler` — the LightningModule: loads the denoiser and student from the config's `model` section (the same
  keys as calibration) and the λ file, and turns a batch of seeds into uint8 images.
* `ImageStore` — the output folder: EDM's PNG layout and/or `.npz` shards, every file written under a temporary
  name and renamed, so a killed run leaves only whole files; a rerun skips seeds already written.
* `SampleWriter` — the `BasePredictionWriter` that hands each batch to the store.

Images depend only on their seed: latents and labels come from one generator per seed (`seeded_noise`), so world
size and batch size do not change them (see docs/sampling.md for the floating-point caveat of the exact model).
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Literal, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_write_bytes, is_temporary_of
from .denoisers import FirstStepMean, eps_and_denoised
from .distill import SEED_LIMIT, seeded_noise
from .lambda_file import LambdaFile, lambdas_to_apply
from .errors import ConfigError
from .fid import Detector, FrechetDistance, Reference, clamped_fid, load_reference_side, make_metric
from .images import GRID_FILE, GRID_SEEDS, MANIFEST, image_grid, to_uint8
from .lightning import build_student
from .solvers import Solver

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "parse_seeds",
    "format_seeds",
    "seed_ranges",
    "union_seeds",
    "to_uint8",
    "sample_seeds",
    "FixedBatch",
    "in_fixed_batches",
    "ImageStore",
    "SeedData",
    "DODESampler",
    "SampleWriter",
    "SampleBatch",
    "PredictTimer",
    "RankWatchdog",
    "rank_failure_check",
    "write_grid",
    "FIDCallback",
]

MANIFEST_FORMAT = "dode-lightning/samples/1"
# Seeds of one run: the seed list, the per-seed done flags and the manifest merge stay well under a GB.
MAX_SEEDS = 10_000_000
Format = Literal["png", "npz", "both"]
# Held by a run for its whole life, so that a second run into the same folder is refused (`ImageStore.lock`).
LOCK_FILE = ".sampling.lock"
# The names this package writes in the outdir, its PNG folders and npz/: the only targets whose temporaries a
# rerun deletes.
_TOP_LEVEL_FILE = re.compile(r"manifest\.json|metrics\.json|grid\.png")
_PNG_FOLDER = re.compile(r"\d{6,}")
_PNG_FILE = re.compile(r"\d{6,}\.png")
_SHARD_FILE = re.compile(r"seeds-\d{6,}-n\d+\.npz")


def seed_ranges(*specs: str) -> list[tuple[int, int]]:
    """The union of seed specs (`0-49999`, `5`, `0,10-19,100`) as sorted, disjoint, inclusive (first, last) ranges.

    Seeds are EDM's: a 32-bit generator seed each, so a larger seed would repeat the image of seed mod 2³² and is
    refused. Nothing is materialised, so a huge range costs nothing here.
    """
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        for part in str(spec).split(","):
            # At most 20 digits: anything longer is out of range anyway, and int() of it would be slow or refused.
            match = re.fullmatch(r"\s*(\d{1,20})\s*(?:-\s*(\d{1,20})\s*)?", part)
            if match is None:
                raise ConfigError(f"malformed seed range {_shorten(spec)!r}: use e.g. 0-49999, 7 or 0,10-19 (non-negative, inclusive, below 2^32)")
            first = int(match[1])
            last = int(match[2]) if match[2] is not None else first
            if last < first:
                raise ConfigError(f"malformed seed range {_shorten(spec)!r}: {first}-{last} is empty (write the smaller seed first)")
            if last >= SEED_LIMIT:
                raise ConfigError(f"seed {last} is too large: seeds are 32-bit generator seeds (0 … {SEED_LIMIT - 1}), a larger one would repeat the image of seed mod 2^32")
            ranges.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def parse_seeds(spec: str, limit: int = MAX_SEEDS) -> list[int]:
    """`0-49999`, `5`, `0,10-19,100` → sorted list of distinct seeds in [0, 2³²), at most `limit` of them."""
    ranges = seed_ranges(spec)
    count = sum(last - first + 1 for first, last in ranges)
    if count > limit:
        raise ConfigError(f"--seeds {_shorten(spec)!r} asks for {count} seeds; at most {limit} per run: split the range over several runs into the same --outdir")
    return [seed for first, last in ranges for seed in range(first, last + 1)]


def union_seeds(*specs: str) -> str:
    """The union of seed specs, written as `parse_seeds` reads it (`0-14,20`), without listing the seeds."""
    return ",".join(f"{first}" if first == last else f"{first}-{last}" for first, last in seed_ranges(*specs))


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_seeds(seeds: Sequence[int]) -> str:
    """Inverse of `parse_seeds` for a sorted list: consecutive runs collapse to `a-b`."""
    runs: list[str] = []
    start = prev = None
    for seed in seeds:
        if prev is not None and seed == prev + 1:
            prev = seed
            continue
        if start is not None:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = seed
    if start is not None:
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(runs)


class FixedBatch(nn.Module):
    """Evaluates a denoiser on exactly `size` samples per call, padding the last chunk with copies of its last sample.

    CPU kernels pick blocking and algorithms by shape, so a sample's result can change in the last bits with the
    batch it shares (measured: ~1e-5 on a float32 EDM network, enough to flip uint8 pixels). With one fixed shape
    every seed goes through identical arithmetic whatever the predict batch size or world size.
    """

    def __init__(self, denoiser: nn.Module, size: int) -> None:
        super().__init__()
        self.denoiser, self.size = denoiser, size

    def _in_fixed_batches(self, fn: Callable[..., Tensor], x: Tensor, sigma: Tensor | float, class_labels: Tensor | None) -> Tensor:
        per_sample = torch.is_tensor(sigma) and sigma.ndim > 0 and sigma.shape[0] == len(x)
        if per_sample:
            return in_fixed_batches(fn, self.size, x, sigma, class_labels)
        return in_fixed_batches(lambda xs, labels: fn(xs, sigma, labels), self.size, x, class_labels)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        return self._in_fixed_batches(self.denoiser, x, sigma, class_labels)

    def eps_and_denoised(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Both outputs stacked on dim 1, so they are chunked and padded together.
        both = self._in_fixed_batches(lambda *args: torch.stack(eps_and_denoised(self.denoiser, *args), 1), x, sigma, class_labels)
        return both[:, 0], both[:, 1]


def in_fixed_batches(fn: Callable[..., Tensor], size: int, *per_sample: Tensor | None) -> Tensor:
    """`fn` on chunks of exactly `size` samples of the per-sample arguments (None passes through), the last chunk
    padded with copies of its last sample; the outputs of the real samples, concatenated (see `FixedBatch`)."""
    count, outputs = len(per_sample[0]), []
    for start in range(0, count, size):
        parts = [None if t is None else t[start : start + size] for t in per_sample]
        taken = len(parts[0])
        padded = [None if t is None else torch.cat([t, t[-1:].expand(size - taken, *t.shape[1:])]) for t in parts]
        outputs.append(fn(*padded)[:taken])
    return torch.cat(outputs)


def sample_seeds(
    solver: Solver,
    denoiser: nn.Module,
    seeds: Sequence[int],
    image_shape: tuple[int, ...],
    label_dim: int = 0,
    lambdas: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None]:
    """Final states (N, C, H, W) and one-hot labels (or None) for `seeds`; each sample depends only on its seed."""
    noise, labels = seeded_noise(seeds, image_shape, label_dim, dtype)
    labels = None if labels is None else labels.to(device)
    return solver.sample(denoiser, noise.to(device), lambdas, labels), labels


def _png_bytes(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 → PNG bytes (grey for one channel, RGB for three), as EDM saves them."""
    pil = Image.fromarray(image[0], "L") if image.shape[0] == 1 else Image.fromarray(image.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class SampleBatch:
    """What `DODESampler.predict_step` returns: all seeds of the batch with their uint8 images.

    `fresh` marks the ones generated now (the others were read back from disk for FID, or are zero placeholders
    when nothing needs them); `labels` holds the class index of fresh samples (−1: unconditional or not fresh).
    """

    seeds: Tensor
    images: Tensor
    fresh: Tensor
    labels: Tensor


class ImageStore:
    """The output folder: PNGs at `<outdir>/<seed − seed % 1000:06d>/<seed:06d>.png` and/or `.npz` shards in
    `<outdir>/npz/` (keys `seeds` (N,), `images` uint8 (N, H, W, C), `labels` (N,), −1 when unconditional)."""

    def __init__(self, outdir: str | Path, fmt: Format = "png") -> None:
        if fmt not in ("png", "npz", "both"):
            raise ConfigError(f"unknown output format {fmt!r}; choose png, npz or both")
        self.outdir = Path(outdir)
        self.png = fmt in ("png", "both")
        self.npz = fmt in ("npz", "both")
        self.shard_of: dict[int, Path] = {}
        self.good_png: set[int] = set()
        self._lock: IO[str] | None = None

    def png_path(self, seed: int) -> Path:
        return self.outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"

    @property
    def shard_dir(self) -> Path:
        return self.outdir / "npz"

    def check_layout(self, seeds: Sequence[int], files: Sequence[str] = (MANIFEST,)) -> None:
        """Refuse an outdir where something of the wrong kind sits at a path this run writes; reads and creates nothing."""
        folders = [self.png_path(seed).parent for seed in sorted({seed - seed % 1000 for seed in seeds})] if self.png else []
        if self.npz:
            folders.append(self.shard_dir)
        for folder in folders:
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{folder} is not a folder, but this run writes its images there; move it away or choose another --outdir")
        for name in (*files, LOCK_FILE):
            path = self.outdir / name
            if path.exists() and not path.is_file():
                raise ConfigError(f"{path} is not a file, but this run writes that file; move it away or choose another --outdir")

    def lock(self) -> None:
        """Hold an exclusive lock on the folder until `unlock` or the process ends (the kernel drops it even on kill -9).

        Two runs into one folder with different --batch-size would write the same seeds into different shards.
        """
        if fcntl is None:  # no flock (Windows): the documented rule "one command per folder" is all there is
            return
        handle = open(self.outdir / LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"another sample.py run is writing into {self.outdir}; wait for it to finish or choose another --outdir") from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove_temporaries(self) -> int:
        """Delete the temporaries a killed run of this package left: `.<name>.XXXX.tmp` where <name> is one of its own
        file names, in the outdir itself, its PNG folders and npz/ only. Nothing else is touched. Call before any
        rank writes."""
        places = [(self.outdir, _TOP_LEVEL_FILE), (self.shard_dir, _SHARD_FILE)]
        places += [(folder, _PNG_FILE) for folder in self.outdir.iterdir() if _PNG_FOLDER.fullmatch(folder.name) and folder.is_dir()]
        count = 0
        for folder, target in places:
            if not folder.is_dir() or folder.is_symlink():
                continue
            for entry in folder.iterdir():
                if is_temporary_of(entry.name, target) and entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)
                    count += 1
        return count

    def scan(self, seeds: Iterable[int], image_shape: tuple[int, ...]) -> None:
        """Index what is on disk and intact: shards whose arrays open and agree with the image shape, and the PNGs of
        `seeds` that decode to it. Anything else counts as missing and is regenerated (a broken PNG is replaced; a
        broken shard is left where it is, with a warning, and its seeds go into a new one)."""
        self.shard_of = {}
        if self.npz and self.shard_dir.is_dir():
            for shard in sorted(self.shard_dir.glob("seeds-*.npz")):
                stored = _shard_seeds(shard, image_shape)
                if stored is None:
                    warnings.warn(f"npz shard {shard} is unreadable or malformed; its seeds are generated again (delete it)")
                    continue
                for seed in stored.tolist():
                    if self.shard_of.setdefault(int(seed), shard) != shard:
                        raise ConfigError(
                            f"npz shards {self.shard_of[int(seed)].name} and {shard.name} in {self.shard_dir} both hold seed {seed} "
                            "(sample.py writes each seed once): delete the one sample.py did not write, or both to generate their seeds again, and rerun"
                        )
        self.good_png = {seed for seed in seeds if _png_intact(self.png_path(seed), image_shape)} if self.png else set()

    def done(self, seed: int) -> bool:
        """Written, intact, in every requested format (as of the last `scan` and this process's writes)."""
        return (not self.png or seed in self.good_png) and (not self.npz or seed in self.shard_of)

    def load(self, seed: int) -> np.ndarray:
        """The stored uint8 image (C, H, W) of a written seed."""
        if seed in self.good_png:
            with Image.open(self.png_path(seed)) as pil:
                array = np.array(pil)  # a writable copy: torch.from_numpy refuses read-only arrays
            return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        seeds, images = _read_shard(self.shard_of[seed])
        return images[int(np.flatnonzero(seeds == seed)[0])].transpose(2, 0, 1)

    def write(self, seeds: Sequence[int], images: np.ndarray, labels: Sequence[int]) -> None:
        """Write the formats each seed still lacks; PNGs one by one, the npz part as one shard named by its first seed.

        A seed is in at most one shard: a rerun regenerates only seeds missing from the index built by `scan`.
        """
        if self.png:
            for seed, image in zip(seeds, images):
                if seed not in self.good_png:
                    atomic_write_bytes(self.png_path(seed), _png_bytes(image))
                    self.good_png.add(seed)
        if self.npz:
            keep = [i for i, seed in enumerate(seeds) if seed not in self.shard_of]
            if not keep:
                return
            shard = self.shard_dir / f"seeds-{seeds[keep[0]]:06d}-n{len(keep)}.npz"
            buffer = io.BytesIO()
            np.savez(
                buffer,
                seeds=np.asarray([seeds[i] for i in keep], dtype=np.int64),
                images=np.ascontiguousarray(images[keep].transpose(0, 2, 3, 1)),
                labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
            )
            atomic_write_bytes(shard, buffer.getvalue())
            for i in keep:
                self.shard_of[seeds[i]] = shard

    def collect(self, seeds: Iterable[int]) -> np.ndarray:
        """Stored images of `seeds` as (N, C, H, W) uint8 (tests and benchmarks)."""
        return np.stack([self.load(int(seed)) for seed in seeds])


def _png_intact(path: Path, image_shape: tuple[int, ...]) -> bool:
    """The file decodes completely to an image of `image_shape` (C, H, W)."""
    channels, height, width = image_shape
    if not path.is_file():
        return False
    try:
        with Image.open(path) as pil:
            if pil.size != (width, height) or pil.mode != ("L" if channels == 1 else "RGB"):
                return False
            pil.load()
    except Exception:  # a damaged file fails in whichever decoder step meets the damage; all mean "regenerate"
        return False
    return True


def _stored_npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member `<key>.npy` from its header alone; refuses (ValueError) a compressed member (np.savez
    never writes one: inflating it could cost gigabytes) and one whose size is not what its header declares."""
    info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{key}.npy is compressed")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if fortran_order or dtype.hasobject or info.file_size != member.tell() + math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{key}.npy does not hold the array its header declares")
    return shape, dtype


def _shard_seeds(path: Path, image_shape: tuple[int, ...]) -> np.ndarray | None:
    """The `seeds` array of a shard whose three arrays agree with each other and `image_shape`; else None.

    Only the member headers and the seeds (at most MAX_SEEDS) are read: nothing is inflated, and the check costs at
    most the shard's size on disk in memory (a compressed 4 MB shard used to expand to 3.5 GB before its seeds counted as done).
    """
    channels, height, width = image_shape
    try:
        with zipfile.ZipFile(path) as archive:
            (seeds_shape, seeds_dtype), (images_shape, images_dtype), (labels_shape, _) = (
                _stored_npy_header(archive, key) for key in ("seeds", "images", "labels")
            )
            consistent = (
                len(seeds_shape) == 1 and seeds_shape[0] <= MAX_SEEDS and seeds_dtype.kind in "iu" and labels_shape == seeds_shape
                and images_dtype == np.uint8 and images_shape == (seeds_shape[0], height, width, channels)
            )
            if not consistent:
                return None
            with archive.open("seeds.npy") as member:
                seeds = np.lib.format.read_array(member, allow_pickle=False)
    except Exception:  # truncated zip, bad member, missing key, a header that lies: all mean "regenerate"
        return None
    return seeds if len(np.unique(seeds)) == len(seeds) else None


@functools.lru_cache(maxsize=4)
def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["seeds"], data["images"]


class SeedImages(Dataset):
    """Item i: (seed, already written, the stored image if it is needed for FID else zeros)."""

    def __init__(self, seeds: Sequence[int], store: ImageStore, image_shape: tuple[int, ...], load_written: bool) -> None:
        self.seeds, self.store, self.image_shape, self.load_written = list(seeds), store, tuple(image_shape), load_written

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> tuple[int, bool, Tensor]:
        seed = self.seeds[index]
        # The done check is race-free under DDP: the sampler gives each seed to exactly one rank.
        done = self.store.done(seed)
        if done and self.load_written:
            return seed, True, torch.from_numpy(np.ascontiguousarray(self.store.load(seed)))
        return seed, done, torch.zeros(self.image_shape, dtype=torch.uint8)


class SeedData(pl.LightningDataModule):
    """The seeds to sample, batched; `load_written` reads already-written images back (FID needs every image)."""

    def __init__(self, seeds: Sequence[int], store: ImageStore, batch_size: int = 64, load_written: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
        self.seeds, self.store, self.batch_size, self.load_written = list(seeds), store, batch_size, load_written
        self.already_written = 0

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        refusal = None
        if trainer.global_rank == 0:
            self.store.outdir.mkdir(parents=True, exist_ok=True)
            try:
                self.store.lock()
            except ConfigError as err:
                refusal = str(err)
            else:
                self.store.remove_temporaries()
        # Every rank stops on rank 0's refusal, and none writes before the leftovers are gone.
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal is not None:
            raise ConfigError(refusal)
        self.store.scan(self.seeds, trainer.lightning_module.image_shape)
        self.already_written = sum(self.store.done(seed) for seed in self.seeds)

    def predict_dataloader(self) -> DataLoader:
        module: DODESampler = self.trainer.lightning_module
        dataset = SeedImages(self.seeds, self.store, module.image_shape, self.load_written)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)


class DODESampler(pl.LightningModule):
    """Samples a D-ODE (or base) solver for a frozen denoiser.

    The first eight arguments are the sampling-relevant keys of the config's `model` section, with the same meaning
    as in `DODECalibration`. `lambdas`: λ file from train.py, or None / "none" for the base solver; with a file,
    solver, NFE and grid are the ones it was fitted for (the arguments are ignored), and a file fitted for another
    schedule or denoiser is refused. `class_conditional`: draw one label per seed after its
    latents (EDM); default: what the λ file was fitted with, else whether the denoiser has labels. `eval_batch`:
    samples per network call (`FixedBatch`); part of the numerics, so it is recorded with the output.
    """

    def __init__(
        self,
        denoiser: dict[str, Any] | None = None,
        solver: str = "heun",
        nfe: int = 9,
        grid: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        terminal_zero: bool | None = None,
        state_dtype: Literal["float32", "float64"] = "float64",
        lambdas: str | None = None,
        class_conditional: bool | None = None,
        eval_batch: int = 64,
    ) -> None:
        super().__init__()
        if eval_batch < 1:
            raise ConfigError(f"--eval-batch must be ≥ 1, got {eval_batch}")
        use_file = lambdas is not None and str(lambdas).lower() != "none"
        if use_file:
            fitted_file = LambdaFile.read(lambdas)
            fitted = fitted_file.settings()
            self.built = build_student(
                denoiser, fitted["solver"], fitted["nfe"], fitted["grid"], state_dtype=state_dtype, grid_kwargs=fitted["grid_kwargs"],
                sigmas=lambda schedule: fitted_file.load(schedule=schedule)[0]["sigmas"],
            )
        else:
            self.built = build_student(denoiser, solver, nfe, grid, sigma_min, sigma_max, rho, state_dtype, terminal_zero=terminal_zero)
        self.eval_batch = eval_batch
        network = self.built.loaded.denoiser
        self.decoder = self.built.loaded.decoder
        self.student = self.built.solver
        self.lambda_file: dict[str, Any] | None = None
        self.network_nfe = self.student.nfe  # network calls per sample (the NFE train.py was given)
        fitted_conditional = None
        lam = None
        if use_file:
            tensors, meta = fitted_file.load(expect=self.built.metadata(), schedule=self.built.setup.schedule)
            lam = lambdas_to_apply(lambdas, tensors, meta, self.student.num_stages, self.built.loaded.image_shape)
            if "first_denoised" in tensors:  # first_step mean: the first evaluation is the stored x̂₀
                network = FirstStepMean(network, float(self.student.sigmas[0]), tensors["first_denoised"])
                self.network_nfe -= 1
            self.lambda_file = {"path": str(Path(lambdas).resolve()), "sha256": fitted_file.sha256, "metadata": meta}
            fitted_conditional = meta.get("class_conditional")
        self.denoiser = FixedBatch(network, eval_batch)
        self.register_buffer("lambdas", lam, persistent=False)
        label_dim = self.built.loaded.label_dim
        if class_conditional is None:
            class_conditional = fitted_conditional if fitted_conditional is not None else label_dim > 0
        if class_conditional and label_dim == 0:
            raise ConfigError("class_conditional is true but the denoiser has no class labels")
        self.label_dim = label_dim if class_conditional else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a written image (decoded, for a latent model)."""
        return self.built.loaded.output_shape or self.built.loaded.image_shape

    def identity(self) -> dict[str, Any]:
        """What determines the images of a seed; a rerun into the same folder must agree on all of it."""
        return {
            **self.built.metadata(),
            "class_conditional": self.label_dim > 0,
            "eval_batch": self.eval_batch,
            "lambdas": None if self.lambda_file is None else self.lambda_file["sha256"],
        }

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> SampleBatch:
        seeds, done, images = batch
        fresh = ~done
        images = images.clone()
        labels = torch.full((len(seeds),), -1, dtype=torch.long)
        if fresh.any():
            x, onehot = sample_seeds(
                self.student, self.denoiser, seeds[fresh].tolist(), self.built.loaded.image_shape, self.label_dim, self.lambdas, self.built.dtype, self.device
            )
            if self.decoder is not None:  # latent model: images are the VAE's decoding, in fixed chunks like the net
                x = in_fixed_batches(self.decoder, self.eval_batch, x)
            images[fresh.to(images.device)] = to_uint8(x).to(images.device)
            if onehot is not None:
                labels[fresh.cpu()] = onehot.argmax(-1).cpu()
        return SampleBatch(seeds.cpu(), images, fresh.cpu(), labels)


def write_grid(store: ImageStore, seeds: Sequence[int], image_shape: tuple[int, ...]) -> np.ndarray:
    """Write `<outdir>/grid.png`: the first GRID_SEEDS seeds in rows of 8, upscaled (nearest neighbour) to cells of
    at least 64 pixels; returns the grid as uint8 (H, W, C). Call after every rank finished writing."""
    shown = list(seeds)[:GRID_SEEDS]
    store.scan(shown, image_shape)  # other ranks wrote some of them: this process's index does not list those
    images = torch.from_numpy(store.collect(shown))
    grid = image_grid(images.to(torch.float64) / 127.5 - 1)  # u/127.5 − 1 maps back to u/255 exactly
    array = (grid * 255).round().to(torch.uint8).numpy()
    atomic_write_bytes(store.outdir / GRID_FILE, _png_bytes(array))
    return array.transpose(1, 2, 0)


def write_manifest(outdir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(outdir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(outdir: Path) -> dict[str, Any] | None:
    path = Path(outdir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"{path} is unreadable ({reason}); choose another --outdir") from None
    try:
        valid = manifest["format"] == MANIFEST_FORMAT and isinstance(manifest["identity"], dict) and bool(seed_ranges(manifest["seeds"]))
    except (TypeError, KeyError, ConfigError):
        valid = False
    if not valid:
        raise ConfigError(f"{path} is not a dode-lightning sample manifest; choose another --outdir")
    return manifest


class SampleWriter(BasePredictionWriter):
    """Writes each predicted batch through the store as it arrives, and the manifest (rank 0) at the start."""

    def __init__(self, store: ImageStore, manifest: dict[str, Any]) -> None:
        super().__init__(write_interval="batch")
        self.store, self.manifest = store, manifest
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:
            write_manifest(self.store.outdir, self.manifest)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: SampleBatch,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        keep = prediction.fresh.nonzero().flatten()
        if len(keep):
            seeds = prediction.seeds[keep].tolist()
            self.store.write(seeds, prediction.images[keep].cpu().numpy(), prediction.labels[keep].tolist())
            self.written += len(seeds)


# Exit codes of a rank that SIGINT or SIGTERM stopped (`cli_common.Interrupted`), and how long rank 0 gives its own
# handling of the same signal (which ends the watch) before it reports such a rank as failed.
INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
INTERRUPT_GRACE = 2.0
# How long a rank whose collective broke waits to see which rank ended (seconds; it ends as soon as one is seen, and
# an exiting rank's interpreter shutdown takes 1–2 s on a busy machine).
DEAD_RANK_WAIT = 10.0


class RankWatchdog(Callback):
    """Under DDP: when another rank dies mid-run (killed, crashed, or ended on an error of its own), this process
    prints one line naming it, ending with `advice` (sample.py: the rerun resumes), and ends within `interval` seconds
    (exit code 1). train.py's ranks run the teacher before the callbacks' setup starts the watch: a rank that dies
    then is named when the survivors' next collective breaks (`on_exception`).

    Why a thread that polls processes: the survivors are inside, or heading into, a gloo collective that fails only at
    its timeout (30 minutes by default, and a shorter one would also fire on a slow but healthy rank), and until then
    they keep sampling, a launched rank even without the folder lock once rank 0 is gone. A signal handler cannot
    stop them (Python runs it between bytecodes of the main thread, not inside a collective), and an abort file would
    not be written by a rank killed with SIGKILL. The process table covers every case: rank 0, which launched the
    others, polls their exit codes; a launched rank sees that its parent is gone (it is re-parented). Every file is
    written atomically, so ending the process from the thread (`os._exit`) leaves only whole files and hidden
    temporaries that the rerun deletes. A rank that SIGINT/SIGTERM stopped counts as failed only after
    INTERRUPT_GRACE seconds: a Ctrl-C reaches every rank, and rank 0 then reports it in its own line. `stop` receives
    the message (default: print it and `os._exit(1)`).
    """

    def __init__(
        self, interval: float = 0.05, stop: Callable[[str], None] | None = None, advice: str = "every file written is whole: rerun the same command to resume"
    ) -> None:
        self.interval = interval
        self.stop = stop or _print_and_exit
        self.advice = advice
        self.finished = threading.Event()
        self.check: Callable[[], str | None] | None = None
        self.rank = 0
        # A launched rank builds this at its start, while its launching process lives; `on_exception` may bind later.
        self.parent = os.getppid()

    def _bind(self, trainer: pl.Trainer) -> None:
        self.check, self.rank = rank_failure_check(trainer, self.parent), trainer.global_rank

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._bind(trainer)
        if self.check is not None:
            self.finished.clear()
            threading.Thread(target=self._watch, daemon=True, name="dode-rank-watchdog").start()

    def _watch(self) -> None:
        while not self.finished.wait(self.interval) and not self._stop_on_failure():
            pass

    def _stop_on_failure(self) -> bool:
        failure = self.check()
        if failure is not None:
            self.stop(f"{failure}, so rank {self.rank} stopped too; {self.advice}")
        return failure is not None

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Also checked before each batch by the main thread itself, which a busy machine may run long before the thread.
        if self.check is not None:
            self._stop_on_failure()

    # The watch ends with predict or fit (other ranks then exit on their own) or with this rank's own error or interrupt.
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finished.set()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.finished.set()
        if self.check is None:  # failed before the callbacks' setup (train.py's teacher runs in the datamodule's)
            self._bind(trainer)
        # A rank that failed is still exiting when this one's collective breaks (gloo: RuntimeError "Connection
        # closed by peer"): the socket closes before the process table shows the end (its exit code, or a launched
        # rank's re-parenting). Wait for it and name it, rather than print the broken connection's traceback.
        if self.check is not None and isinstance(exception, RuntimeError):
            deadline = time.monotonic() + DEAD_RANK_WAIT
            while not self._stop_on_failure() and time.monotonic() < deadline:
                time.sleep(self.interval)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.finished.set()


def rank_failure_check(trainer: pl.Trainer, parent: int | None = None) -> Callable[[], str | None] | None:
    """A function describing the first dead rank this process can see (None while all live); None without DDP or
    where this process sees none (a rank 0 that launched no process). `parent`: a launched rank's launching process
    (default: the current parent; pass the one seen earlier where it may already be gone)."""
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if trainer.world_size < 2:
        return None
    launcher = trainer.strategy.launcher
    first = trainer.node_rank * trainer.num_devices  # the node's rank 0, which launched the node's other ranks
    if trainer.local_rank > 0:
        parent = os.getppid() if parent is None else parent
        name = f"rank {first} (pid {parent})" if isinstance(launcher, _SubprocessScriptLauncher) else f"the launching process (pid {parent})"
        return lambda: f"{name} ended" if os.getppid() != parent else None
    children = list(getattr(launcher, "procs", None) or [])
    if not children:
        return None

    stopped_at: dict[int, float] = {}

    def check() -> str | None:
        for local_rank, process in enumerate(children, 1):
            code = process.poll()
            if code in INTERRUPTED_CODES and time.monotonic() - stopped_at.setdefault(local_rank, time.monotonic()) < INTERRUPT_GRACE:
                continue  # stopped by Ctrl-C or SIGTERM, which this process got too: its own line is on the way
            if code:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
                return f"rank {first + local_rank} (pid {process.pid}) {how}"
        return None

    return check


def _print_and_exit(message: str) -> None:
    from tqdm import tqdm

    from .cli_common import release_run_folders

    # Progress bars are cleared first (the line is then the last one, not appended to a bar's last update) and not
    # redrawn: the process ends inside the context.
    with tqdm.external_write_mode(file=sys.stderr):
        print(f"error: {message}", file=sys.stderr, flush=True)
        release_run_folders()  # an FID run's TensorBoard folder: the run did not finish
        os._exit(1)


class PredictTimer(Callback):
    """Wall time of the predict loop alone (process start-up and DDP launch excluded), between barriers on all ranks."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("dode_predict_start")
        self.started = time.perf_counter()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("dode_predict_end")
        self.seconds = time.perf_counter() - self.started


class FIDCallback(Callback):
    """FID of the predicted images against a reference (`dode_lightning.fid.FrechetDistance`).

    Real side: npz statistics are loaded on global rank 0 only (states are summed across ranks); folder and exact
    references are split across ranks. Fake side: every predict batch on every rank. At the end of predict the states
    are summed across ranks (a collective: every rank takes part) and scored; rank 0 logs and writes metrics.json.
    """

    def __init__(self, detector: Detector, reference: Reference, outdir: str | Path, batch_size: int = 64, extra: dict[str, Any] | None = None) -> None:
        self.detector, self.reference, self.outdir, self.batch_size = detector, reference, Path(outdir), batch_size
        self.extra = extra or {}
        self.value: float | None = None
        self.num_generated = 0
        self.metric: FrechetDistance | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.metric = make_metric(self.detector).to(pl_module.device)
        load_reference_side(self.metric, self.reference, self.batch_size, trainer.global_rank, trainer.world_size)

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: SampleBatch, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.metric.update(outputs.images.to(pl_module.device), real=False)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pooled = self.metric.synced(lambda state: trainer.strategy.reduce(state, reduce_op="sum"))
        self.value = clamped_fid(pooled)
        self.num_generated = n_fake = int(pooled.fake_features_num_samples)
        if trainer.global_rank != 0:
            return
        record = {
            "metric": self.detector.metric_name,
            "value": self.value,
            "num_generated": n_fake,
            "detector": self.detector.name,
            "detector_identity": self.detector.identity,
            "num_features": self.detector.num_features,
            "reference": self.reference.describe(),
            **self.extra,
        }
        atomic_write_bytes(self.outdir / "metrics.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        if trainer.logger is not None:
            trainer.logger.log_metrics({"fid/value": self.value, "fid/num_generated": float(n_fake)}, step=0)
            trainer.logger.save()
