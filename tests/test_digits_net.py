"""The learned digits network's training script (benchmarks/train_digits_net.py): reproducible, written correctly."""
from __future__ import annotations

import torch

from benchmarks.train_digits_net import build_network, train
from dode_lightning.checkpoints.edm_pickle import read_snapshot
from dode_lightning.checkpoints.edm_writer import write_edm_snapshot


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
