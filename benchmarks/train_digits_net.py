"""Train the learned digits network: a narrow SongUNet inside EDMPrecond, EDM loss, on the built-in model's data.

The exact digits mixture has no score error, so it cannot show a D-variant overfitting its calibration batch; this
network (same data, same x/8 − 1 scaling, trained for a few minutes on CPU) is the second testbed. It is written in
the EDM snapshot format of `dode_lightning.checkpoints.edm_writer` and loads through
`load_denoiser("edm_pickle", DIGITS_NET_PATH)` (restricted unpickler). Seeds are fixed: the same command with the
same thread count on the same torch build writes the same weights.
Usage: PYTHONPATH=. python benchmarks/train_digits_net.py [--steps 2000] [--out dode_lightning/data/edm_digits_net.pkl]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from dode_lightning.atomic import atomic_path
from dode_lightning.checkpoints.edm_writer import write_edm_snapshot
from dode_lightning.gmm import digits_data
from dode_lightning.networks import EDMPrecond
from dode_lightning.networks.edm import UNetBlock

DIGITS_NET_PATH = Path("dode_lightning/data/edm_digits_net.pkl")
# DDPM++-style SongUNet cut down to 8×8 digits: two resolutions (8×8, 4×4), one block each, attention only in the
# decoder's 4×4 input block (which SongUNet always has); ≈ 0.67 M parameters, 2.7 MB in float32.
NETWORK = dict(
    model_type="SongUNet", model_channels=32, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
    attn_resolutions=[], dropout=0.0, embedding_type="positional", encoder_type="standard", decoder_type="standard",
)
# EDM's training noise distribution (Karras et al. 2022, Table 1): ln σ ~ N(P_mean, P_std²).
P_MEAN, P_STD = -1.2, 1.2


def build_network(sigma_data: float, seed: int) -> EDMPrecond:
    """The untrained network. Residual branches and the output conv start near zero (EDM's `init_zero`, weight
    scale 1e-5), so every block starts as the identity and D(x; σ) as c_skip·x."""
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=8, img_channels=1, sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data, **NETWORK)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, UNetBlock):
                module.conv1.weight.mul_(1e-5)
        net.model.dec["8x8_aux_conv"].weight.mul_(1e-5)
    return net


def edm_loss(net: nn.Module, images: Tensor, generator: torch.Generator) -> Tensor:
    """EDM's training loss (Karras et al. 2022, Eq. 8 with Table 1's λ(σ) and p_train):
    E ‖λ(σ)^½·(D(y + σn; σ) − y)‖², λ(σ) = (σ² + σ_d²)/(σ·σ_d)², ln σ ~ N(P_mean, P_std²)."""
    sigma = (torch.randn(len(images), 1, 1, 1, generator=generator) * P_STD + P_MEAN).exp()
    weight = (sigma**2 + net.sigma_data**2) / (sigma * net.sigma_data) ** 2
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (weight * (net(images + noise, sigma) - images) ** 2).mean()


def batches(count: int, batch_size: int, generator: torch.Generator):
    """Endless minibatch indices: a fresh permutation of the data per epoch."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(steps: int, batch_size: int, lr: float, warmup: int, ema_halflife: int, seed: int, log_every: int) -> tuple[EDMPrecond, list[tuple[int, float]]]:
    """Adam on the EDM loss with a linear lr warm-up; returns the EMA of the weights and the logged losses
    (mean training loss over each `log_every` steps)."""
    images, _ = digits_data()
    images = images.to(torch.float32)
    # σ_data: the pixel standard deviation of the training data (0.752 for x/8 − 1), as EDM's preconditioning assumes.
    sigma_data = round(float(images.std()), 2)
    net = build_network(sigma_data, seed)
    ema = build_network(sigma_data, seed).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    beta = 0.5 ** (1.0 / ema_halflife)
    generator = torch.Generator().manual_seed(seed)
    history, running = [], []
    for step, index in zip(range(1, steps + 1), batches(len(images), batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        loss = edm_loss(net, images[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), net.parameters()):
                averaged.lerp_(current, 1.0 - beta)
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append((step, sum(running) / len(running)))
            running = []
            print(f"step {step:5d}  loss {history[-1][1]:.4f}", flush=True)
    return ema.eval(), history


def ema_loss(net: EDMPrecond, seed: int, repeats: int = 8) -> float:
    """The EDM loss of the final (EMA) network over the whole data set, `repeats` noise draws, fixed seed."""
    images, _ = digits_data()
    images = images.to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        return sum(float(edm_loss(net, images, generator)) for _ in range(repeats)) / repeats


def main() -> None:
    args_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args_parser.add_argument("--steps", type=int, default=2000)
    args_parser.add_argument("--batch-size", type=int, default=128)
    args_parser.add_argument("--lr", type=float, default=1e-3)
    args_parser.add_argument("--warmup", type=int, default=200, help="steps of linear lr warm-up")
    args_parser.add_argument("--ema-halflife", type=int, default=200, help="EMA half-life in steps")
    args_parser.add_argument("--seed", type=int, default=0)
    args_parser.add_argument("--threads", type=int, default=1)
    args_parser.add_argument("--log-every", type=int, default=100)
    args_parser.add_argument("--out", default=str(DIGITS_NET_PATH))
    args = args_parser.parse_args()
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    net, history = train(args.steps, args.batch_size, args.lr, args.warmup, args.ema_halflife, args.seed, args.log_every)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    final = ema_loss(net, args.seed)
    out = Path(args.out)
    dataset = dict(class_name="sklearn.datasets.load_digits", scaling="x/8 - 1", resolution=8, use_labels=False, max_size=1797)
    training = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_halflife=args.ema_halflife,
                    seed=args.seed, threads=args.threads, P_mean=P_MEAN, P_std=P_STD, final_ema_loss=final)
    with atomic_path(out) as tmp:
        write_edm_snapshot(tmp, net, dataset_kwargs=dataset, extra=dict(training_kwargs=training))
    params = sum(p.numel() for p in net.parameters())
    print(f"{params:,} parameters, σ_data {net.sigma_data}; {args.steps} steps in {wall:.0f} s wall / {cpu:.0f} s CPU "
          f"({args.threads} thread(s)); last logged training loss {history[-1][1]:.4f}, EMA network loss {final:.4f} "
          f"(whole data set, 8 noise draws); wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    if not math.isfinite(final):
        raise SystemExit("error: training diverged (non-finite loss); lower --lr")


if __name__ == "__main__":
    main()
