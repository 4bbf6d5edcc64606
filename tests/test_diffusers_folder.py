"""diffusers DDPM folders: the fixture written by diffusers 0.42.1, its 2022-era variant, and the optional-extra path."""
import builtins
import json
import shutil

import pytest
import torch

from dode_lightning.checkpoints import CheckpointError, load_denoiser
from dode_lightning.checkpoints.diffusers_folder import DIFFUSERS_INSTALL_HINT, DiffusersDDIMClip, convert_legacy_attention_names
from dode_lightning.schedules import VPDiscrete
from dode_lightning.solvers import make_solver
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(fixture_path("diffusers", "tiny-ddpm.expected.pt"), weights_only=False)


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("diffusers")
    return load_denoiser("diffusers", fixture_path("diffusers", "tiny-ddpm"))


def test_fields_and_schedule(loaded, expected):
    assert loaded.image_shape == (3, 32, 32) and loaded.label_dim == 0 and loaded.source == "diffusers"
    assert isinstance(loaded.schedule, VPDiscrete) and loaded.schedule.num_timesteps == 1000
    torch.testing.assert_close(loaded.schedule.betas, expected["betas"].double(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, expected["alphas_cumprod"].double(), rtol=0, atol=1e-6)
    assert len(loaded.identity) == 64
    assert not loaded.denoiser.training and not any(p.requires_grad for p in loaded.denoiser.parameters())


def test_eps_at_recorded_timesteps(loaded, expected):
    with torch.no_grad():
        eps = loaded.denoiser.eps_model(expected["x"], expected["timesteps"])
    torch.testing.assert_close(eps, expected["eps"], rtol=0, atol=1e-5)


def test_denoiser_is_eps_model_in_sigma_form(loaded, expected):
    """D(x̄; σ_t) = x̄ − σ_t·ε(√ᾱ_t·x̄, t) with x̄ = x_t/√ᾱ_t (checkpoints.md §10)."""
    schedule = loaded.schedule
    t = expected["timesteps"]
    sigma = schedule.sigma(t.double())
    x_bar = expected["x"].double() / schedule.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        denoised = loaded.denoiser(x_bar, sigma)
    eps = (x_bar - denoised) / sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps, expected["eps"].double(), rtol=0, atol=1e-5)


def test_ddim_reproduces_diffusers(loaded, expected):
    ddim = expected["ddim"]
    solver = make_solver("ddim", 10, loaded.schedule)
    assert torch.equal(loaded.schedule.sigma_inv(solver.sigmas[:-1]).round().long(), ddim["timesteps"])
    with torch.no_grad():
        final = solver.sample(DiffusersDDIMClip(loaded.denoiser, solver.sigmas), ddim["latents"])
    torch.testing.assert_close(final, ddim["final"], rtol=0, atol=1e-3)
    torch.testing.assert_close((final / 2 + 0.5).clamp(0, 1), ddim["image01"], rtol=0, atol=1e-3)


def test_ddim_clip_wrapper_is_tied_to_its_grid(loaded):
    solver = make_solver("ddim", 10, loaded.schedule)
    wrapped = DiffusersDDIMClip(loaded.denoiser, solver.sigmas)
    with pytest.raises(ValueError, match="tied to its grid"):
        wrapped(torch.zeros(1, 3, 32, 32), 5.0)


def _legacy_copy(tmp_path, expected):
    """The fixture folder rewritten in the 2022 layout: .bin weights (torch.save) with the old attention names."""
    from safetensors.torch import load_file

    folder = tmp_path / "ddpm-2022"
    shutil.copytree(fixture_path("diffusers", "tiny-ddpm"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    renamed = {}
    for name, value in state.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            name = name.replace(new, old)
        renamed[name] = value
    assert sorted(renamed) == sorted(expected["legacy_tensor_names"])
    weights.unlink()
    torch.save(renamed, folder / "unet" / "diffusion_pytorch_model.bin")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    del config["prediction_type"]  # absent in old configs: the default (epsilon) applies
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_legacy_layout(tmp_path, expected, loaded, monkeypatch):
    folder = _legacy_copy(tmp_path, expected)
    loads = []
    original_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or original_load(*a, **k))
    legacy = load_denoiser("diffusers", folder)
    assert loads == [True]  # .bin weights read with weights_only=True
    for (name, a), (_, b) in zip(legacy.denoiser.state_dict().items(), loaded.denoiser.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        eps = legacy.denoiser.eps_model(expected["x"], expected["timesteps"])
    torch.testing.assert_close(eps, expected["eps"], rtol=0, atol=1e-5)


def test_legacy_name_conversion():
    state = {"mid_block.attentions.0.proj_attn.weight": 1, "mid_block.attentions.0.query.bias": 2, "down_blocks.0.resnets.0.conv1.weight": 3}
    assert list(convert_legacy_attention_names(state)) == [
        "mid_block.attentions.0.to_out.0.weight", "mid_block.attentions.0.to_q.bias", "down_blocks.0.resnets.0.conv1.weight"
    ]


def test_bad_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="google/ddpm-cifar10-32"):
        load_denoiser("diffusers", tmp_path / "nowhere")
    pytest.importorskip("diffusers")
    folder = tmp_path / "copy"
    shutil.copytree(fixture_path("diffusers", "tiny-ddpm"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        load_denoiser("diffusers", folder)
    assert "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_denoiser("diffusers", folder)
    torch.save({"conv_in.weight": torch.zeros(1)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="do not match"):
        load_denoiser("diffusers", folder)


def test_missing_diffusers_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ImportError, match=r"pip install 'dode-lightning\[diffusers\]'") as err:
        load_denoiser("diffusers", fixture_path("diffusers", "tiny-ddpm"))
    assert str(err.value) == DIFFUSERS_INSTALL_HINT


def _folder_with(tmp_path, scheduler: dict | None = None, unet: dict | None = None, raw: dict | None = None):
    """A copy of the fixture folder with config fields replaced (None deletes), or a config file's raw text."""
    folder = tmp_path / "ddpm"
    shutil.copytree(fixture_path("diffusers", "tiny-ddpm"), folder)
    for name, changes in (("scheduler/scheduler_config.json", scheduler), ("unet/config.json", unet)):
        config = json.loads((folder / name).read_text())
        for key, value in (changes or {}).items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        (folder / name).write_text(json.dumps(config))
    for name, text in (raw or {}).items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    "scheduler,unet,raw,message",
    [
        ({"num_train_timesteps": 0}, None, None, "num_train_timesteps is 0; expected an integer from 2 to 100000"),
        ({"num_train_timesteps": 10**12}, None, None, "num_train_timesteps is 1000000000000; expected"),
        ({"num_train_timesteps": "1000"}, None, None, "num_train_timesteps is '1000'; expected"),
        ({"beta_start": float("nan")}, None, None, "beta_start is nan; expected a number strictly between 0 and 1"),
        ({"beta_end": 1.5}, None, None, "beta_end is 1.5; expected a number strictly between 0 and 1"),
        ({"beta_start": 0}, None, None, "beta_start is 0; expected"),
        ({"trained_betas": [0.1] * 9 + [1.0]}, None, None, "1 β value(s) outside (0, 1) (first β_9 = 1)"),
        ({"trained_betas": "0.1"}, None, None, "trained_betas is not a list of 2 to 100000 numbers"),
        ({"beta_schedule": "evil\x1b[2J"}, None, None, "unsupported beta_schedule 'evil\\x1b[2J'"),
        (None, {"sample_size": 0}, None, "sample_size is 0; expected an integer (or two) from 1 to 4096 divisible by 2"),
        (None, {"sample_size": 10**6}, None, "sample_size is 1000000; expected"),
        (None, {"sample_size": 31}, None, "sample_size is 31; expected"),
        (None, {"sample_size": [32, "x"]}, None, "sample_size is [32, 'x']; expected"),
        (None, {"sample_size": None}, None, "sample_size is None; expected"),
        (None, {"in_channels": 0}, None, "in_channels is 0; expected an integer from 1 to 64"),
        (None, {"out_channels": 1}, None, "in_channels != out_channels"),
        (None, {"layers_per_block": 10**9}, None, "layers_per_block is 1000000000; expected an integer from 1 to 64"),
        (None, None, {"unet/config.json": "[" * 100_000 + "]" * 100_000}, "unreadable JSON"),
        (None, None, {"unet/config.json": " " * (2 << 20) + "{}"}, "larger than 1 MiB"),
    ],
    ids=lambda value: None,
)
def test_bad_configs_are_one_line_errors(tmp_path, scheduler, unet, raw, message):
    # Before: T = 0, NaN or β > 1 loaded (black images later); T = 10¹², sample_size 0 or 10⁶ gave tracebacks.
    pytest.importorskip("diffusers")
    with pytest.raises(CheckpointError) as err:
        load_denoiser("diffusers", _folder_with(tmp_path, scheduler, unet, raw))
    text = str(err.value)
    assert message in text and text.isprintable(), text


def test_bad_sample_size_fails_before_sampling_writes_anything(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from dode_lightning.sample_cli import sample_main

    monkeypatch.chdir(tmp_path)
    folder = _folder_with(tmp_path, unet={"sample_size": 10**6})
    config = tmp_path / "c.yaml"
    config.write_text(f"trainer: {{logger: false}}\nmodel: {{denoiser: {{source: diffusers, path: {folder}}}, solver: ddim, nfe: 2}}\n")
    outdir = tmp_path / "out"
    assert sample_main(["--config", str(config), "--lambdas", "none", "--seeds", "0-1", "--outdir", str(outdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sample_size is 1000000" in err[0], err
    assert not outdir.exists()


@pytest.mark.parametrize("kind", ["deflated", "legacy"])
def test_bin_weights_must_be_an_uncompressed_zip(tmp_path, kind, monkeypatch):
    # Before: torch.load inflated a deflated member whole (a zip bomb) or allocated legacy storages as claimed.
    from dode_lightning.checkpoints.edm_writer import deflated_zip_blob

    pytest.importorskip("diffusers")
    folder = _folder_with(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    if kind == "deflated":
        weights.write_bytes(deflated_zip_blob(8 << 20))
    else:
        torch.save({"conv_in.weight": torch.zeros(1)}, weights, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(CheckpointError) as err:
        load_denoiser("diffusers", folder)
    assert ("compressed member" if kind == "deflated" else "not a zip-format torch.save file") in str(err.value)
