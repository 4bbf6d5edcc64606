"""The one entry point: sources, options, and messages for missing checkpoints."""
import pytest
import torch

from dode_lightning.checkpoints import LoadedDenoiser, load_denoiser
from dode_lightning.gmm import GaussianMixture
from dode_lightning.schedules import EDM


def test_gmm_digits_source():
    loaded = load_denoiser("gmm_digits")
    assert isinstance(loaded, LoadedDenoiser) and isinstance(loaded.denoiser, GaussianMixture)
    assert loaded.image_shape == (1, 8, 8) and loaded.label_dim == 10
    assert loaded.identity == "gmm_digits" and loaded.source == "gmm_digits"
    assert isinstance(loaded.schedule, EDM) and (loaded.schedule.sigma_min, loaded.schedule.sigma_max) == (0.002, 80.0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert loaded.denoiser(x, 1.0).shape == x.shape
    assert load_denoiser("gmm_digits", covariance_floor=1e-2).identity == "gmm_digits(covariance_floor=0.01)"
    with pytest.raises(ValueError, match="takes no path"):
        load_denoiser("gmm_digits", "somewhere")


def test_missing_files_name_the_public_release(tmp_path):
    with pytest.raises(FileNotFoundError, match="nvlabs-fi-cdn.nvidia.com/edm/pretrained") as err:
        load_denoiser("edm_pickle", tmp_path / "edm-ffhq-64x64-uncond-vp.pkl")
    assert "edm-ffhq-64x64-uncond-vp.pkl" in str(err.value)
    with pytest.raises(ValueError, match="needs a path"):
        load_denoiser("edm_pickle")
    with pytest.raises(FileNotFoundError, match="google/ddpm-cifar10-32"):
        load_denoiser("diffusers", tmp_path / "ddpm-cifar10-32")
    with pytest.raises(ValueError, match="needs a path"):
        load_denoiser("diffusers")


def test_unknown_source_and_option():
    with pytest.raises(ValueError, match="unknown denoiser source"):
        load_denoiser("pt_file", "x")
    with pytest.raises(ValueError, match="unknown option.*accepted: key, device"):
        load_denoiser("edm_pickle", "x", strict=False)
