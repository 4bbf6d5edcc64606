"""Networks the fixture does not cover (VP/VE/iDDPM preconditioning, NCSN++ options, ADM with heads and labels),
round-tripped through EDM-format pickles written by our test writer, plus properties the formulas imply."""
import collections
import math

import pytest
import torch

from dode_lightning.checkpoints import load_denoiser
from dode_lightning.checkpoints.edm_pickle import read_snapshot, recover_state_dict
from dode_lightning.checkpoints.edm_writer import dumps, network_record, persistent_record, write_edm_snapshot
from dode_lightning.networks import EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond
from dode_lightning.networks.edm import Conv2d, UNetBlock


SONG_SMALL = dict(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM_SMALL = dict(img_resolution=16, img_channels=3, model_channels=64, channel_mult=[1, 2, 3], num_blocks=1, attn_resolutions=[16, 8, 4])

CASES = {
    "vp_ddpmpp_cond": (VPPrecond, dict(SONG_SMALL, label_dim=3, augment_dim=9)),
    "ve_ncsnpp": (VEPrecond, dict(SONG_SMALL, **NCSNPP)),
    "ve_ncsnpp_skip_skip": (VEPrecond, dict(SONG_SMALL, **dict(NCSNPP, encoder_type="skip", decoder_type="skip"))),
    "iddpm_adm_cond": (iDDPMPrecond, dict(ADM_SMALL, label_dim=5, model_channels=32, channel_mult=[1, 2])),
    "edm_adm_heads_cond": (EDMPrecond, dict(ADM_SMALL, label_dim=4, use_fp16=True, model_type="DhariwalUNet")),
    "edm_ddpmpp_defaults": (EDMPrecond, dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=8, channel_mult=[1, 2])),
}


def _random_net(cls, kwargs, seed=0):
    torch.manual_seed(seed)
    net = cls(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial norms and zero-initialised biases
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cls, kwargs = CASES[request.param]
    net = _random_net(cls, kwargs)
    path = tmp_path_factory.mktemp("edm") / f"{request.param}.pkl"
    write_edm_snapshot(path, net)
    return request.param, net, path


def _inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, (batch,), generator=g)]
    return x, labels


def test_round_trip_weights_and_outputs(case):
    _name, net, path = case
    loaded = load_denoiser("edm_pickle", path)
    assert type(loaded.denoiser) is type(net) and type(loaded.denoiser.model) is type(net.model)
    original, recovered = net.state_dict(), loaded.denoiser.state_dict()
    assert list(recovered) == list(original)
    for key in original:
        assert torch.equal(recovered[key], original[key]), key
    x, labels = _inputs(net)
    sigma = torch.tensor([0.3, 7.0])
    with torch.no_grad():
        out = loaded.denoiser(x, sigma, labels)
        assert torch.equal(out, net(x, sigma, labels))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert loaded.label_dim == net.label_dim and loaded.image_shape == (3, 16, 16)
    assert loaded.schedule.sigma_min == max(0.002, net.sigma_min) and loaded.schedule.sigma_max == min(80.0, net.sigma_max)


def test_absent_init_kwargs_take_class_defaults(tmp_path):
    """Release files omit num_blocks/attn_resolutions; the reader must apply SongUNet's defaults (4, [16])."""
    net = _random_net(*CASES["edm_ddpmpp_defaults"])
    write_edm_snapshot(tmp_path / "net.pkl", net)
    snapshot, _ = read_snapshot(tmp_path / "net.pkl")
    assert "num_blocks" not in snapshot["ema"].init_kwargs and "attn_resolutions" not in snapshot["ema"].init_kwargs
    loaded = load_denoiser("edm_pickle", tmp_path / "net.pkl").denoiser
    assert sum(name.startswith("16x16_block") for name in loaded.model.enc) == 4
    assert loaded.model.enc["16x16_block0"].num_heads == 1 and loaded.model.enc["8x8_block0"].num_heads == 0


def test_old_torch_layout_with_ordered_dicts(tmp_path):
    """Files from torch 1.12-era writers: OrderedDict tables and fewer hook fields."""
    net = _random_net(*CASES["vp_ddpmpp_cond"])
    record = network_record(net)

    def age(rec):
        state = rec.meta["state"] if hasattr(rec, "meta") else rec.state
        for key in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            state.pop(key, None)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = collections.OrderedDict(state[key])
        for child in state["_modules"].values():
            if child is not None:
                age(child)

    age(record)
    (tmp_path / "old.pkl").write_bytes(dumps({"ema": record}))
    loaded = load_denoiser("edm_pickle", tmp_path / "old.pkl").denoiser
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_mismatched_weights_are_refused(tmp_path):
    net = _random_net(*CASES["ve_ncsnpp"])
    record = network_record(net)
    record.meta["state"]["_init_kwargs"]["model_channels"] = 32  # kwargs now describe a wider network
    (tmp_path / "bad.pkl").write_bytes(dumps({"ema": record}))
    with pytest.raises(ValueError, match="do not match") as err:
        load_denoiser("edm_pickle", tmp_path / "bad.pkl")
    assert "\n" not in str(err.value)


def test_vp_preconditioning():
    net = _random_net(*CASES["vp_ddpmpp_cond"])
    # float32 values of σ_VP(ε_t) and σ_VP(1) as EDM stores them (checkpoints.md §3).
    assert net.sigma_min == 0.0009765625 and net.sigma_max == 152.16697692871094
    x, labels = _inputs(net)
    sigma = net.sigma(torch.tensor(0.5))
    seen = {}
    net.model.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0], noise=args[1]))
    with torch.no_grad():
        out = net(x, sigma, labels)
        raw = net.model(seen["x"], seen["noise"], labels)
    torch.testing.assert_close(seen["x"], x / (sigma**2 + 1).sqrt())  # c_in = 1/√(σ²+1)
    torch.testing.assert_close(seen["noise"], torch.full((1,), 999 * 0.5), rtol=0, atol=2e-3)  # c_noise = (M−1)·t
    torch.testing.assert_close(out, x - sigma * raw, rtol=1e-6, atol=1e-6)  # c_skip 1, c_out −σ


def test_ve_preconditioning():
    net = _random_net(*CASES["ve_ncsnpp"])
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)
    x, _ = _inputs(net)
    with torch.no_grad():
        out = net(x, 4.0)
        raw = net.model(x, torch.full((1,), math.log(2.0)), None)
    torch.testing.assert_close(out, x + 4.0 * raw, rtol=1e-5, atol=1e-5)  # c_in 1, c_out σ, c_noise ln(σ/2)


def test_edm_preconditioning_limits():
    net = _random_net(*CASES["edm_adm_heads_cond"])
    x, labels = _inputs(net)
    with torch.no_grad():
        assert (net(x, 1e-7, labels) - x).abs().max() < 1e-5  # c_skip → 1, c_out → 0 as σ → 0
        big = net(x, 1e7, labels)
        raw = net.model(x / math.sqrt(1e14 + 0.25), torch.full((1,), math.log(1e7) / 4), labels)
    torch.testing.assert_close(big, 0.5 * raw, rtol=1e-4, atol=1e-5)  # c_skip → 0, c_out → σ_data


def test_iddpm_table_and_variance_channels():
    net = _random_net(*CASES["iddpm_adm_cond"])
    u = net.u
    assert len(u) == 1001 and u[-1] == 0 and bool((u[:-1] > u[1:]).all())
    assert net.sigma_min == pytest.approx(6.4e-3, rel=0.05) and net.sigma_max == pytest.approx(2.0e4, rel=0.05)
    assert torch.equal(net.round_sigma(torch.tensor([u[10] * 1.001, u[500] * 0.999])), u[[10, 500]])
    seen = {}
    net.model.register_forward_pre_hook(lambda _m, args: seen.update(noise=args[1]))
    x, labels = _inputs(net)
    with torch.no_grad():
        before = net(x, u[250] * 1.0001, labels)
        assert seen["noise"].item() == 999 - 250  # c_noise = M − 1 − j
        net.model.out_conv.weight[3:].normal_()  # the variance half of the output
        net.model.out_conv.bias[3:].normal_()
        assert torch.equal(net(x, u[250] * 1.0001, labels), before)


def test_adm_heads_and_labels():
    net = _random_net(*CASES["edm_adm_heads_cond"])
    heads = {name: block.num_heads for name, block in net.model.enc.items() if isinstance(block, UNetBlock)}
    assert heads["16x16_block0"] == 1 and heads["8x8_block0"] == 2 and heads["4x4_block0"] == 3
    assert net.model.dec["4x4_in0"].num_heads == 3 and net.model.dec["4x4_in1"].num_heads == 0
    x, labels = _inputs(net, batch=4)
    with torch.no_grad():
        onehot = net(x, 1.0, labels)
        assert torch.equal(net(x, 1.0, labels.argmax(1)), onehot)  # integer labels accepted
        torch.testing.assert_close(net(x, 1.0, None), net(x, 1.0, torch.zeros_like(labels)))
        assert not torch.allclose(net(x, 1.0, labels.roll(1, dims=1)), onehot)
    assert net.use_fp16 and onehot.dtype == torch.float32  # fp32 compute regardless of use_fp16


def test_ncsnpp_layout():
    net = _random_net(*CASES["ve_ncsnpp"]).model
    assert isinstance(net, SongUNet)
    residual = net.enc["8x8_aux_residual"]
    assert isinstance(residual, Conv2d) and residual.fused_resample and residual.resample_filter.shape == (1, 1, 4, 4)
    assert net.map_noise.freqs.shape == (16,)  # noise channels 32 = 16·channel_mult_noise 2, half of them frequencies
    skip = _random_net(*CASES["ve_ncsnpp_skip_skip"]).model
    assert {"8x8_aux_down", "8x8_aux_skip"} <= set(skip.enc) and {"16x16_aux_up", "8x8_aux_conv"} <= set(skip.dec)
    assert skip.enc["8x8_aux_down"].weight is None  # resample-only


def test_crafted_record_state_is_checked(tmp_path):
    """A record whose parameter table holds a non-tensor is refused cleanly."""
    record = persistent_record("VEPrecond", {"_parameters": {"w": "not a tensor"}, "_init_kwargs": {}})
    (tmp_path / "odd.pkl").write_bytes(dumps({"ema": record}))
    with pytest.raises(ValueError, match="expected a tensor"):
        load_denoiser("edm_pickle", tmp_path / "odd.pkl")


def test_recovered_state_dict_skips_none_entries(tmp_path):
    """None parameters/buffers (weightless resample convs, unused resample filters) are not state-dict entries."""
    net = _random_net(*CASES["ve_ncsnpp_skip_skip"])
    write_edm_snapshot(tmp_path / "net.pkl", net)
    snapshot, _ = read_snapshot(tmp_path / "net.pkl")
    assert list(recover_state_dict(snapshot["ema"])) == list(net.state_dict())
