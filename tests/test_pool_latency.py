"""Pooling the measured savings of identical blocks: which blocks are identical, and the medians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.backends.base import LatencySettings, LatencyStats
from graphprune.passes import Blocks
from graphprune.passes.measure_latency import BlockLatency, BlockLatencyTable
from graphprune.passes.pool_latency import PoolIdenticalBlocks, identical_groups, pool_savings
from graphprune.passes.select_blocks import block_scores


class Residual(nn.Module):
    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class Mixed(nn.Module):
    """Same shapes everywhere; only some blocks compute the same thing."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a0, self.a1 = Residual(8), Residual(8)           # identical
        self.k5 = Residual(8, kernel=5)                        # other kernel: other weight shape
        self.d2 = Residual(8, dilation=2)                      # same weight shape, other dilation
        self.a2 = Residual(8)                                  # identical to a0 / a1 again
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a2(self.d2(self.k5(self.a1(self.a0(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_identical_blocks_are_grouped_and_different_ones_are_not():
    model = gp.load(Mixed(), input_shape=(1, 3, 16, 16))
    blocks = gp.find_blocks(model)
    assert [b.name for b in blocks] == ["a0", "a1", "k5", "d2", "a2"]
    assert identical_groups(model, blocks) == [["a0", "a1", "a2"]]


def test_resnet56_groups_its_stages_in_every_front_end(tmp_path):
    module = gp.load("zoo:cifar10_resnet56")
    path = tmp_path / "r56.onnx"
    gp.save(module, path)
    expected = [[f"layer1.{i}" for i in range(9)], [f"layer2.{i}" for i in range(1, 9)],
                [f"layer3.{i}" for i in range(1, 9)]]  # the stride-2 transitions layer2.0 / layer3.0 stand alone
    for model in (module, gp.load(path)):
        assert identical_groups(model, gp.find_blocks(model)) == expected


def _table(fractions: dict[str, float]) -> BlockLatencyTable:
    stats = LatencyStats(10.0, 9.0, 11.0, 10.0, 0.5, 20)
    rows = [BlockLatency(n, 10 * f, f, 10.0, 10 * (1 - f)) for n, f in fractions.items()]
    return BlockLatencyTable(stats, rows, LatencySettings(), {})


def test_pooled_saving_is_the_group_median_and_loners_keep_theirs():
    table = _table({"a": 0.030, "b": 0.045, "c": 0.036, "d": 0.020, "e": 0.050})
    pooled = pool_savings(table, [["a", "b", "c"], ["d", "e"]]).saved_fractions()
    assert pooled["a"] == pooled["b"] == pooled["c"] == pytest.approx(0.036)
    assert pooled["d"] == pooled["e"] == pytest.approx(0.035)
    lone = pool_savings(table, [["a", "b"]]).saved_fractions()
    assert lone["c"] == 0.036 and lone["a"] == pytest.approx(0.0375)
    assert table.saved_fractions()["a"] == 0.030  # the measured table is untouched
    assert pool_savings(table, [["a", "b"]]).pooled_groups == [["a", "b"]] and table.pooled_groups == []


def test_selection_ranks_identical_blocks_by_recoverability_alone():
    """With measured savings a noisy 3.0% vs 4.5% decides between two identical blocks; pooled,
    the more recoverable block comes first."""
    model = gp.load(Mixed(), input_shape=(1, 3, 16, 16))
    table = _table({"a0": 0.030, "a1": 0.045, "k5": 0.040, "d2": 0.040, "a2": 0.036})
    result = PoolIdenticalBlocks()(model, None, Blocks(gp.find_blocks(model)), table)
    assert result.record["groups"] == [{"blocks": ["a0", "a1", "a2"], "measured": [0.030, 0.045, 0.036],
                                        "pooled": 0.036}]
    recoverability = {"a0": 0.010, "a1": 0.013, "k5": 1.0, "d2": 1.0, "a2": 0.5}
    assert [s.name for s in block_scores(recoverability, table)][:2] == ["a1", "a0"]
    assert [s.name for s in block_scores(recoverability, result.value)][:2] == ["a0", "a1"]
