"""Channel-split residuals (ShuffleNetV2's unit, ``cat(x1, f(x2))`` of the halves of ``x``): found
as blocks of kind ``split`` by their values, whether the halves come from ``torch.chunk`` or ONNX
Slices, dropped exactly (the concat becomes the entry), and optimized end to end. Before, ShuffleNet
stopped with "no residual blocks found"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from conftest import export_onnx, optimized_file_agrees, seeded_module
from graphprune.passes import zero_branch


def _branch(width):
    return nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width),
                         nn.Conv2d(width, width, 1), nn.ReLU())


class _Unit(nn.Module):
    """``how``: "chunk" / "slice" (a split block), "swapped" (the branch's half first: a channel
    permutation of the entry once the branch goes, not a block), "overlap" (halves that share a
    channel: not the entry either)."""

    def __init__(self, width, how):
        super().__init__()
        self.how, self.half = how, width // 2
        self.branch = _branch(width // 2)

    def forward(self, x):
        if self.how == "chunk":
            a, b = x.chunk(2, dim=1)
        elif self.how == "overlap":
            a, b = x[:, :self.half], x[:, self.half - 1:-1]
        else:
            a, b = x[:, :self.half], x[:, self.half:]
        y = self.branch(b)
        return torch.cat((y, a) if self.how == "swapped" else (a, y), dim=1)


class SplitNet(nn.Module):
    def __init__(self, hows=("chunk", "slice", "swapped", "overlap", "chunk"), width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU())
        self.units = nn.Sequential(*[_Unit(width, how) for how in hows])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.units(self.stem(x)).mean((2, 3)))


def _net():
    return seeded_module(SplitNet)


def _onnx(tmp_path):
    return export_onnx(_net(), (1, 3, 32, 32), tmp_path / "split.onnx", opset=17)


@pytest.fixture(params=["torch", "onnx"])
def model(request, tmp_path):
    if request.param == "torch":
        return gp.load(_net(), input_shape=(1, 3, 32, 32))
    return gp.load(_onnx(tmp_path))


def test_split_units_are_blocks_and_swapped_or_overlapping_halves_are_not(model):
    blocks = gp.find_blocks(model)
    assert [b.kind for b in blocks] == ["split"] * 3
    assert [b.name.split(".")[-1] for b in blocks] == ["0", "1", "4"]
    for block in blocks:
        assert block.input_shape == block.output_shape == (1, 16, 16, 16)
        assert block.branch_input in block.branch and block.shortcut_output == block.entry


def test_dropping_a_split_block_equals_its_branch_as_the_identity(model):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blocks = gp.find_blocks(model)
    before = {n.name for n in model.graph_module.graph.nodes}
    for block in blocks:
        dropped = gp.drop_blocks(model, [block.name], blocks)
        assert torch.allclose(dropped.run(x), zero_branch(model, block).run(x), atol=1e-6)
        assert (dropped.run(x) - model.run(x)).abs().max() > 1e-5  # the branch did something
        after = {n.name for n in dropped.graph_module.graph.nodes}
        assert set(block.branch) | {block.merge} <= before - after  # the branch and the concat went
        assert block.name not in [b.name for b in gp.find_blocks(dropped)]


@pytest.mark.slow  # about 15 s
def test_optimize_drops_split_blocks_and_writes_what_onnxruntime_runs(tmp_path):
    from test_vit import FAST_CONFIG

    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    optimized_file_agrees(gp.load(_onnx(tmp_path)), images, FAST_CONFIG, tmp_path / "fast.onnx")
