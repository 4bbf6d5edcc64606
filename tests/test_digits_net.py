"""The shipped learned digits network (benchmarks/train_digits_net.py): loads as data, is trained, is reproducible."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.train_digits_net import DIGITS_NET_PATH, build_network, edm_loss, train
from dode_lightning.checkpoints import load_denoiser
from dode_lightning.checkpoints.edm_pickle import read_snapshot
from dode_lightning.checkpoints.edm_writer import write_edm_snapshot
from dode_lightning.gmm import digits_data

ROOT = Path(__file__).resolve().parents[1]
NETWORK = ROOT / DIGITS_NET_PATH


@pytest.fixture(scope="module")
def loaded():
    return load_denoiser("edm_pickle", NETWORK)


def test_shipped_network_loads_through_the_restricted_unpickler(loaded):
    assert NETWORK.stat().st_size < 5 * 2**20
    assert loaded.image_shape == (1, 8, 8) and loaded.label_dim == 0
    assert (loaded.schedule.sigma_min, loaded.schedule.sigma_max) == (0.002, 80.0)
    assert loaded.denoiser.sigma_data == 0.75  # pixel std of the x/8 − 1 digits
    snapshot, _ = read_snapshot(NETWORK)
    assert snapshot["loss_fn"].state["sigma_data"] == 0.75
    assert snapshot["dataset_kwargs"]["class_name"] == "sklearn.datasets.load_digits"


def test_shipped_network_denoises_digits_far_better_than_its_untrained_start(loaded):
    images = digits_data()[0][:200].to(torch.float32)
    with torch.no_grad():
        trained = edm_loss(loaded.denoiser, images, torch.Generator().manual_seed(0))
        untrained = edm_loss(build_network(0.75, seed=0).eval(), images, torch.Generator().manual_seed(0))
    assert float(trained) < 0.5 * float(untrained)


def test_training_is_reproducible_from_its_seed():
    def weights():
        torch.set_num_threads(1)
        net, history = train(steps=2, batch_size=8, lr=1e-3, warmup=1, ema_halflife=1, seed=3, log_every=1)
        return torch.cat([p.reshape(-1) for p in net.parameters()]), history

    (first, first_losses), (second, second_losses) = weights(), weights()
    assert torch.equal(first, second) and first_losses == second_losses


def test_writer_records_the_networks_sigma_data_in_the_loss(tmp_path):
    net = build_network(0.75, seed=0)
    write_edm_snapshot(tmp_path / "net.pkl", net)
    snapshot, _ = read_snapshot(tmp_path / "net.pkl")
    assert snapshot["loss_fn"].class_name == "EDMLoss" and snapshot["loss_fn"].state["sigma_data"] == 0.75
