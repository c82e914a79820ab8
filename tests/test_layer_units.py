"""A network without residual blocks (VGG, PP-LCNet) drops its stride-1,
channel-keeping layers instead (passes/layer_units.py): each weighted op with the weight-free tail
that keeps its shape (a norm, a hard-swish written out as x * clip(x + 3, 0, 6) / 6), found alike
in PyTorch and through ONNX, dropped as the identity, optimized end to end. Before, such a network
stopped with "no residual blocks found" wherever int8 alone did not reach the target."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from conftest import export_onnx, optimized_file_agrees, seeded_module
from graphprune.ops import op_kind
from graphprune.passes import zero_branch


class HardSwishWritten(nn.Module):
    """PaddlePaddle's exports write hard-swish out: Add, Clip, Mul, Div in ONNX."""

    def forward(self, x):
        return x * torch.clamp(x + 3, 0, 6) / 6


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())  # reads the input: no unit
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), HardSwishWritten())
        self.widen = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU())  # changes the shape: no unit
        self.pw = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(2)  # after pw: not part of its unit
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.pw(self.widen(self.dw(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def _net():
    return seeded_module(PlainNet)


def _onnx_path(tmp_path):
    return export_onnx(_net(), (1, 3, 32, 32), tmp_path / "plain.onnx", opset=17)


def test_layer_units_alike_in_pytorch_and_onnx(tmp_path):
    traced = gp.find_blocks(gp.load(_net(), input_shape=(1, 3, 32, 32)))
    from_onnx = gp.load(_onnx_path(tmp_path))
    exported = gp.find_blocks(from_onnx)
    assert [b.kind for b in traced] == [b.kind for b in exported] == ["layer", "layer"]
    assert [b.name for b in traced] == ["dw.0", "pw.0"]
    assert [b.input_shape for b in traced] == [b.output_shape for b in traced] == [(1, 16, 16, 16), (1, 32, 16, 16)]
    # the written-out hard-swish joins its layer (the exporter folds the norm into the conv)
    nodes = {n.name: n for n in from_onnx.graph_module.graph.nodes}
    kinds = [[op_kind(nodes[name], from_onnx.graph_module) for name in (*b.branch, b.exit)] for b in exported]
    assert kinds == [["conv", "add", "relu6", "mul", "div"], ["conv", "relu"]]


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_dropping_a_layer_equals_the_network_with_an_identity_in_its_place(source, tmp_path):
    model = gp.load(_net(), input_shape=(1, 3, 32, 32)) if source == "torch" else gp.load(_onnx_path(tmp_path))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blocks = gp.find_blocks(model)
    for block, attribute in zip(blocks, ("dw", "pw")):
        reference = copy.deepcopy(_net())
        setattr(reference, attribute, nn.Identity())
        dropped = gp.drop_blocks(model, [block.name], blocks)
        assert torch.allclose(dropped.run(x), reference(x), atol=1e-5)
        assert torch.allclose(dropped.run(x), zero_branch(model, block).run(x), atol=1e-6)
        removed = {n.name for n in model.graph_module.graph.nodes} - {n.name for n in dropped.graph_module.graph.nodes}
        assert set(block.branch) | {block.exit} <= removed
    assert not any(b.kind == "layer" for b in gp.find_blocks(gp.load("zoo:cifar10_resnet20")))


@pytest.mark.slow  # about 10 s
def test_optimize_drops_layers_of_a_plain_network_and_writes_what_onnxruntime_runs(tmp_path):
    from test_vit import FAST_CONFIG

    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    optimized_file_agrees(gp.load(_onnx_path(tmp_path)), images, FAST_CONFIG, tmp_path / "fast.onnx")


class _Elan(nn.Module):
    """YOLOv7's ELAN in small: a chain of 3x3 layers whose outputs the final Concat also reads."""

    def __init__(self, width=16):
        super().__init__()
        half = width // 2
        self.stem = nn.Conv2d(3, width, 3, 2, 1)
        self.cv1, self.cv2 = nn.Conv2d(width, half, 1), nn.Conv2d(width, half, 1)
        self.chain = nn.ModuleList(nn.Sequential(nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.SiLU())
                                   for _ in range(4))
        self.out, self.head = nn.Conv2d(2 * width, width, 1), nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        first, second = self.cv1(x), self.cv2(x)
        chain = [second]
        for layer in self.chain:
            chain.append(layer(chain[-1]))
        return self.head(self.out(torch.cat([chain[4], chain[2], second, first], 1)).mean((2, 3)))


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_layers_read_by_a_concat_too_are_units_and_drop_to_the_identity(source, tmp_path):
    net = seeded_module(_Elan)
    model = gp.load(net, input_shape=(1, 3, 32, 32)) if source == "torch" else \
        gp.load(export_onnx(net, (1, 3, 32, 32), tmp_path / "elan.onnx", opset=17))
    blocks = gp.find_blocks(model)
    assert [b.kind for b in blocks] == ["layer"] * 4
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for i, block in enumerate(blocks):
        reference = copy.deepcopy(net)
        reference.chain[i] = nn.Identity()
        assert torch.allclose(gp.drop_blocks(model, [block.name], blocks).run(x), reference(x), atol=1e-5), block.name
