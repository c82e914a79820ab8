"""memory.training_batch: a training step takes fewer images where their activations would not fit."""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune import memory
from graphprune.data import TinySet
from graphprune.memory import TRAINING_MEMORY_SHARE, image_activation_bytes, training_batch
from graphprune.passes.recover import RecoverySettings, recover


def _net():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return gp.load(net.eval(), input_shape=(1, 3, 16, 16))


def test_the_batch_is_what_fits_the_memory_share():
    model = _net()
    per_image = image_activation_bytes(model)
    assert per_image >= 4 * (3 + 8 + 8) * 16 * 16  # the input, the conv's and the ReLU's maps at least
    fits_ten = int(10 * per_image / TRAINING_MEMORY_SHARE) + 1
    assert training_batch(model, 64, available=fits_ten) == 10
    assert training_batch(model, 8, available=fits_ten) == 8
    assert training_batch(model, 64, available=1) == 1  # never none
    assert training_batch(model, 64, available=fits_ten, copies=2) == 5


def test_recovery_trains_on_the_batch_that_fits(monkeypatch):
    model = _net()
    monkeypatch.setattr(memory, "available_memory", lambda: int(3 * image_activation_bytes(model) / TRAINING_MEMORY_SHARE))
    tiny = TinySet(torch.rand(20, 3, 16, 16), torch.full((20,), -1))
    _, record = recover(model, model, tiny, RecoverySettings(iterations=2, batch_size=16, augment="none"),
                        show_progress=False)
    assert record["batch_size"] == 3 and record["settings"]["batch_size"] == 16
