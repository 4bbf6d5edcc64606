"""Noise-side float32 fidelity (issue 14, items 2–3): ε-solvers use the network's own ε, and `train.py` can draw the
official global-stream latents; together they reproduce an independent float32 transcription of the original D-DDIM.

The transcription below follows the official noise-side code (method.md §3.1, §5.1), not this package: the UNet is
called directly by diffusers at the integer timestep, ᾱ is the float32 cumprod of the float32 betas with ᾱ₋₁ = 1,
the step is DDIM's x_next = √ᾱ'·x̂₀ + √(1−ᾱ')·ε with x̂₀ = (x − √(1−ᾱ)·ε)/√ᾱ, the teacher is DDIM with M = C·N steps on
its own `uniform_torch` grid, targets are xs[(k+1)·M/N] (the last xs[M]), and λ (official units) is the float64
least-squares solution of x* − x̃ = λ·(ε − ε_prev), ε_prev = x_T, applied as x̃ + λ·(ε − ε_prev) in float32.
"""
import json
import sys

import pytest
import pytorch_lightning as pl
import torch

from dode_lightning.cli import train_main
from dode_lightning.denoisers import CountingDenoiser, NoGradDenoiser, eps_and_denoised
from dode_lightning.distill import global_stream_noise
from dode_lightning.lambda_file import load_lambdas
from dode_lightning.lightning import DODECalibration, TeacherTargets
from dode_lightning.sampling import FixedBatch
from tests.conftest import fixture_path

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy-2 copy= warnings

T = 1000
SCALE = 10
BATCH = 8
SEED = 1234  # the official noise-side seed of rank 0


@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("diffusers")
    return fixture_path("diffusers", "tiny-ddpm")


@pytest.fixture(scope="module")
def unet(folder):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)


def _uniform_torch(steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs of the official grid ⌊linspace(0, T, N+1)[:N]⌋, descending, the last step to −1."""
    seq = torch.linspace(0, T, steps + 1)[:steps].floor().long().tolist()
    return list(zip(reversed(seq), reversed([-1] + seq[:-1])))


def original_d_ddim(unet, z: torch.Tensor, steps: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """λ (official units) and the D-DDIM samples of the official noise-side code, in float32."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64).float()
    alphas_cumprod = torch.cat([torch.ones(1), (1 - betas).cumprod(0)])  # index t + 1, ᾱ₋₁ = 1

    def eps(x, t):
        return unet(x, torch.full((len(x),), float(t))).sample

    def ddim(x, e, t, t_next):
        a, a_next = alphas_cumprod[t + 1], alphas_cumprod[t_next + 1]
        x0 = (x - e * (1 - a).sqrt()) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * e

    teacher_steps = min(T, scale * steps)
    x, xs = z, [z]
    for t, t_next in _uniform_torch(teacher_steps):
        x = ddim(x, eps(x, t), t, t_next)
        xs.append(x)
    stride = teacher_steps // steps
    targets = [xs[(k + 1) * stride] for k in range(steps - 1)] + [xs[teacher_steps]]
    x, eps_prev, lambdas = z, z, []
    for k, (t, t_next) in enumerate(_uniform_torch(steps)):
        e = eps(x, t)
        base, direction = ddim(x, e, t, t_next), e - eps_prev
        lam = torch.linalg.lstsq(direction.double().reshape(-1, 1), (targets[k] - base).double().reshape(-1, 1)).solution.item()
        x, eps_prev = base + lam * direction, e
        lambdas.append(lam)
    return torch.tensor(lambdas, dtype=torch.float64), x


def _calibrate(folder, steps: int) -> tuple[DODECalibration, TeacherTargets]:
    """configs/ddpm_cifar10.yaml's model (float32 state) with the official targets and the global-stream latents."""
    module = DODECalibration(denoiser={"source": "diffusers", "path": str(folder)}, solver="ddim", nfe=steps, state_dtype="float32")
    data = TeacherTargets(scale=SCALE, batch_size=BATCH, seed=SEED, noise="global_stream", target_mode="paper", cache_dir=None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module, data


# λ rtol per N. N = 10 sits at the float32 floor of the official code itself: on this batch, rounding its ᾱ table
# from float64 instead of its float32 cumprod moves its stage-7 λ (λ_off ≈ 112) by 9.4e-4 relative, one rounding
# of the network input by 7.1e-4 (measured); ours is 3.2e-4 away. Before the ε hand-over: 7.9e-3, images 0.22
# (N = 5: 4.8e-4 and 0.023).
LAMBDA_RTOL = {10: 1e-3, 5: 2e-4}


# N = 10 was the suite's slowest test (820 s at load 10; the teacher runs 100 UNet steps): it runs with -m slow, and
# N = 5 checks the same reproduction in every run.
@pytest.mark.parametrize("steps", [pytest.param(10, marks=pytest.mark.slow), 5])
def test_float32_d_ddim_reproduces_the_original(folder, unet, steps):
    module, data = _calibrate(folder, steps)
    noise, _, _ = data.full_batch()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        z = torch.randn(BATCH, 3, 32, 32)
    assert noise.dtype == torch.float32 and torch.equal(noise, z)
    with torch.no_grad():
        lambdas_official, images_official = original_d_ddim(unet, z, steps, SCALE)
        images = module.student.sample(module.denoiser, noise, module.lambdas.detach())
    lambdas = module.lambdas.detach() * module.closed_form.coeffs  # paper units → official units b_k·λ_k
    relative = ((lambdas - lambdas_official).abs() / lambdas_official.abs()).max().item()
    image_diff = (images.double() - images_official.double()).abs().max().item()
    print(f"N = {steps}: λ max relative difference {relative:.2e}, image max abs difference {image_diff:.2e}")
    torch.testing.assert_close(lambdas, lambdas_official, rtol=LAMBDA_RTOL[steps], atol=0)
    torch.testing.assert_close(images, images_official, rtol=0, atol=2e-2)


def test_wrappers_hand_over_the_networks_own_eps(folder):
    from dode_lightning.checkpoints import load_denoiser

    denoiser = load_denoiser("diffusers", folder).denoiser
    outputs = []
    denoiser.eps_model.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 5
    wrapped = CountingDenoiser(NoGradDenoiser(FixedBatch(denoiser, 3)))  # two chunks of 3, the second padded
    eps, denoised = eps_and_denoised(wrapped, x, 4.0)
    assert wrapped.calls == 1 and len(outputs) == 2
    assert torch.equal(eps, torch.cat([outputs[0], outputs[1][:1]]))  # bit for bit: no x₀ round trip
    assert torch.equal(denoised, FixedBatch(denoiser, 3)(x, 4.0))


def test_x0_networks_keep_the_x0_form(digits):
    """Without a native ε the pair is (x − D)/σ and D itself, as the solvers computed it before."""
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    eps, denoised = eps_and_denoised(CountingDenoiser(digits), x, 3.0)
    expected = digits(x, 3.0)
    assert torch.equal(denoised, expected) and torch.equal(eps, (x - expected) / 3.0)


def test_global_stream_noise_is_the_official_draw():
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        expected = torch.randn(5, 3, 4, 4)
        expected_labels = torch.randint(10, (5,))
    noise, labels = global_stream_noise(SEED, 5, (3, 4, 4), 10, torch.float64)
    assert torch.equal(noise, expected.double()) and torch.equal(labels.argmax(1), expected_labels)
    assert global_stream_noise(SEED, 5, (3, 4, 4))[1] is None


def test_global_stream_ranks_split_one_batch():
    data = TeacherTargets(batch_size=5, seed=7, noise="global_stream", cache_dir=None)
    full, _ = data.calibration_noise((1, 8, 8), 0)
    assert torch.equal(full, global_stream_noise(7, 5, (1, 8, 8))[0])
    shares = [data.calibration_noise((1, 8, 8), 0, torch.float64, rank, 2)[0] for rank in range(2)]
    assert torch.equal(shares[0], full[0::2]) and torch.equal(shares[1], full[1::2])


def test_train_py_global_stream_is_recorded_and_cached_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {logger: false, enable_progress_bar: false}\nmodel: {denoiser: {source: gmm_digits}, solver: euler, nfe: 3}\n"
        "data: {scale: 2, batch_size: 6, seed: 3, class_conditional: false, cache_dir: " + json.dumps(str(tmp_path / "cache")) + "}\n"
    )
    runs = {}
    for noise, report in (("per_seed", "false"), ("global_stream", "true"), ("global_stream", "false")):
        out = tmp_path / f"{noise}.safetensors"
        assert train_main(["--config", str(config), "--data.noise", noise, "--model.output", str(out), "--exact_report", report]) == 0
        runs[noise] = load_lambdas(out)
    assert capsys.readouterr().out.count("| calibration (6) |") == 1  # the report scores the global-stream batch
    assert runs["per_seed"][1]["noise"] == "per_seed" and runs["global_stream"][1]["noise"] == "global_stream"
    assert len(list((tmp_path / "cache").glob("targets-*.pt"))) == 2  # one cache entry per noise, the second run hit it
    assert not torch.equal(runs["per_seed"][0]["lambdas"], runs["global_stream"][0]["lambdas"])
    assert train_main(["--config", str(config), "--data.noise", "shared"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "noise" in err[0], err


@pytest.mark.parametrize("solver", ["ddim", "ipndm", "dpm_solver_2"])
def test_diffusers_scheduler_hands_the_models_eps_to_eps_solvers(monkeypatch, solver):
    pytest.importorskip("diffusers")
    from dode_lightning.diffusers_scheduler import DODEScheduler

    seen = []

    def spy(*args):
        seen.append(eps_and_denoised(*args))
        return seen[-1]

    monkeypatch.setattr("dode_lightning.solvers.stages.eps_and_denoised", spy)  # the one place requests are answered
    scheduler = DODEScheduler(solver=solver, state_dtype="float32")
    scheduler.set_timesteps(4)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k + 1)) for k in range(2)]
    for t, output in zip(scheduler.timesteps, outputs):
        x = scheduler.step(output, t, x).prev_sample
    seen = [pair for pair in seen if pair[0].shape == x.shape]  # set_timesteps probes the solver on a dummy state
    assert len(seen) == 2 and all(torch.equal(eps, output) for (eps, _), output in zip(seen, outputs))
