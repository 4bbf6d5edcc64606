"""EDM network pickles: the fixture written by NVlabs/edm, read without running its code, checked against the
outputs that code recorded (tolerances from ../shared/fixtures/README.md)."""
import hashlib
import json

import pytest
import torch

from dode_lightning.checkpoints import load_denoiser
from dode_lightning.checkpoints.edm_pickle import read_snapshot, recover_state_dict
from dode_lightning.networks import EDMPrecond, SongUNet
from dode_lightning.schedules import EDM
from dode_lightning.solvers import make_solver
from tests.conftest import fixture_path


PICKLE = ("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.pkl")
EXPECTED = ("edm", "tiny-cifar10-32x32-uncond-ddpmpp-edmprecond.expected.pt")


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(fixture_path(*EXPECTED), weights_only=False)


@pytest.fixture(scope="module")
def loaded():
    return load_denoiser("edm_pickle", fixture_path(*PICKLE))


def test_snapshot_is_read_as_data(expected):
    snapshot, digest = read_snapshot(fixture_path(*PICKLE))
    assert list(snapshot) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    assert snapshot["ema"].class_name == expected["precond_class"] == "EDMPrecond"
    assert snapshot["ema"].init_kwargs == json.loads(expected["init_kwargs_json"])
    model = snapshot["ema"].state["_modules"]["model"]
    assert model.class_name == expected["model_class"] == "SongUNet"
    assert model.init_kwargs == json.loads(expected["model_init_kwargs_json"])
    assert snapshot["loss_fn"].class_name == "EDMLoss" and snapshot["augment_pipe"].class_name == "AugmentPipe"
    # numpy.core scalars (numpy 1.26 writer) decoded without numpy: SongUNet blocks store skip_scale = sqrt(0.5).
    block = model.state["_modules"]["enc"].state["_modules"]["16x16_down"]
    assert block.state["skip_scale"] == pytest.approx(0.5**0.5, abs=1e-16)
    assert digest == hashlib.sha256(fixture_path(*PICKLE).read_bytes()).hexdigest()


def test_state_dict_fingerprints(expected):
    snapshot, _ = read_snapshot(fixture_path(*PICKLE))
    state = recover_state_dict(snapshot["ema"])
    assert list(state) == expected["tensor_names"]
    assert [list(t.shape) for t in state.values()] == expected["tensor_shapes"]
    sums = torch.stack([t.double().sum() for t in state.values()])
    sumsq = torch.stack([t.double().square().sum() for t in state.values()])
    torch.testing.assert_close(sums, expected["tensor_sums"], rtol=0, atol=1e-9)
    torch.testing.assert_close(sumsq, expected["tensor_sumsq"], rtol=1e-12, atol=1e-9)


def test_loaded_denoiser_fields(loaded, expected):
    assert isinstance(loaded.denoiser, EDMPrecond) and isinstance(loaded.denoiser.model, SongUNet)
    assert loaded.image_shape == (3, 32, 32) and loaded.label_dim == 0 and loaded.source == "edm_pickle"
    assert isinstance(loaded.schedule, EDM) and (loaded.schedule.sigma_min, loaded.schedule.sigma_max) == (0.002, 80.0)
    assert loaded.identity == hashlib.sha256(fixture_path(*PICKLE).read_bytes()).hexdigest()
    assert not loaded.denoiser.training and not any(p.requires_grad for p in loaded.denoiser.parameters())
    attrs = json.loads(expected["attrs_json"])
    for name, value in attrs.items():
        assert getattr(loaded.denoiser, name) == value, name
    assert list(loaded.denoiser.state_dict()) == expected["tensor_names"]


def test_network_output_matches_recorded(loaded, expected):
    net = loaded.denoiser
    with torch.no_grad():
        model_out = net.model(expected["model_x"], expected["model_noise_labels"], None)
        denoised = net(expected["x"], expected["sigma"])
        denoised_scalar = net(expected["x"], torch.tensor(expected["sigma_scalar"], dtype=torch.float64))
    torch.testing.assert_close(model_out, expected["model_out"], rtol=0, atol=2e-5)
    torch.testing.assert_close(denoised, expected["D"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoised_scalar, expected["D_sigma_scalar"], rtol=1e-5, atol=1e-5)
    assert denoised.dtype == torch.float32


def test_preconditioning_inputs_match_recorded(loaded, expected):
    """c_in·x and c_noise as the original passed them to the inner network."""
    seen = {}
    handle = loaded.denoiser.model.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0], noise=args[1]))
    try:
        with torch.no_grad():
            loaded.denoiser(expected["x"], expected["sigma"])
    finally:
        handle.remove()
    torch.testing.assert_close(seen["x"], expected["model_x"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["noise"], expected["model_noise_labels"], rtol=1e-6, atol=1e-6)


def test_heun_with_loaded_network_reproduces_sampler(loaded, expected):
    sampler = expected["sampler"]
    solver = make_solver("heun", sampler["nfe"], loaded.schedule)
    torch.testing.assert_close(solver.sigmas, sampler["t_steps"], rtol=1e-14, atol=0)
    with torch.no_grad():
        images = solver.sample(loaded.denoiser, sampler["latents"].to(torch.float64))
    torch.testing.assert_close(images, sampler["images"], rtol=0, atol=5e-4)
    as_uint8 = (images * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert (as_uint8.int() - sampler["images_uint8"].int()).abs().max() <= 1
