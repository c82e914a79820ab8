"""Dropping a block equals zeroing its residual branch, on every block of every model."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from conftest import TORCHVISION_MODELS, models_with_slow, torchvision_module
from graphprune.passes import DropBlocks, zero_branch


def _assert_every_block_drops_exactly(model: gp.Model, shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    blocks = gp.find_blocks(model)
    reference = model.run(x)
    for block in blocks:
        dropped = gp.drop_blocks(model, [block.name], blocks)
        zeroed = zero_branch(model, block)
        out_dropped, out_zeroed = dropped.run(x), zeroed.run(x)
        scale = max(1.0, float(out_zeroed.abs().max()))
        assert torch.allclose(out_dropped, out_zeroed, atol=1e-5 * scale, rtol=1e-5), block.name
        assert len(dropped.graph_module.graph.nodes) < len(model.graph_module.graph.nodes), block.name
    assert torch.equal(model.run(x), reference), "dropping must not touch the original model"


@pytest.mark.parametrize("name", models_with_slow("vit_b_16", "swin_t", "regnet_x_400mf", "convnext_tiny"))
def test_drop_equals_zeroed_branch_pytorch(name):
    shape, _ = TORCHVISION_MODELS[name]
    _assert_every_block_drops_exactly(gp.load(torchvision_module(name), input_shape=(1, *shape[1:])), shape)


@pytest.mark.parametrize("name", models_with_slow("vit_b_16", "swin_t", "convnext_tiny"))
def test_drop_equals_zeroed_branch_onnx(name, torchvision_onnx):
    shape, _ = TORCHVISION_MODELS[name]
    _assert_every_block_drops_exactly(gp.load(torchvision_onnx(name)), shape)


@pytest.mark.parametrize("depth", [20, 56])
def test_drop_equals_zeroed_branch_cifar(depth):
    _assert_every_block_drops_exactly(gp.load(f"zoo:cifar10_resnet{depth}"), (3, 3, 32, 32))


def test_drop_removes_only_the_block_and_redundant_relu():
    model = gp.load("zoo:cifar10_resnet20")
    before = {n.name for n in model.graph_module.graph.nodes}
    result = DropBlocks(["layer1.1"])(model)
    after = {n.name for n in result.model.graph_module.graph.nodes}
    removed = before - after
    blocks = {b.name: b for b in gp.find_blocks(model)}
    block = blocks["layer1.1"]
    # the branch, the merge and the post-merge ReLU (a no-op on the previous block's ReLU output)
    assert removed == set(block.branch) | {block.merge, block.exit}
    assert after <= before
    assert result.record["dropped"] == ["layer1.1"] and result.record["removed_activations"] == [block.exit]
    assert "layer1.1" not in [b.name for b in gp.find_blocks(result.model)]


def test_relu_kept_when_shortcut_may_be_negative():
    from torch import nn

    class Net(nn.Module):  # the block input is a conv output (any sign): relu(x + f(x)) -> relu(x)
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.conv(x))
            return self.head(x.mean((2, 3)))

    model = gp.load(Net(), input_shape=(1, 3, 8, 8))
    (block,) = gp.find_blocks(model)
    dropped = gp.drop_blocks(model, [block.name])
    kinds = [n.target for n in dropped.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.relu in kinds
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(dropped.run(x), zero_branch(model, block).run(x), atol=1e-6)


def test_unknown_block_lists_available():
    model = gp.load("zoo:cifar10_resnet20")
    with pytest.raises(gp.GraphpruneError, match=r"unknown block 'layer9.9'; available: layer1.0, layer1.1"):
        gp.drop_blocks(model, ["layer9.9"])


class _ChainNet(torch.nn.Module):
    """``x = x + block(x)`` repeated, with no activation after the merge (MobileNetV2 style)."""

    def __init__(self, depth: int, inplace: bool = False):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=inplace),
                                                  nn.Conv2d(8, 8, 3, padding=1)) for _ in range(depth))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_consecutive_blocks_without_activation_drop_in_any_order():
    """MobileNetV2 / EfficientNet style: no activation after the merge, so each block's identity
    shortcut is the previous block's merge; dropping the earlier block first must still work."""
    from itertools import permutations

    model = gp.load(_ChainNet(3), input_shape=(1, 3, 8, 8))
    blocks = gp.find_blocks(model)
    assert len(blocks) == 3
    x = torch.randn(4, 3, 8, 8)
    for order in [*permutations(blocks, 2), *permutations(blocks, 3)]:
        reference = model
        for block in order:
            reference = zero_branch(reference, block)
        dropped = gp.drop_blocks(model, [b.name for b in order], blocks)
        assert torch.allclose(dropped.run(x), reference.run(x), atol=1e-6), [b.name for b in order]
        kept = {b.name for b in gp.find_blocks(dropped)}
        assert kept == {b.name for b in blocks} - {b.name for b in order}


def test_program_with_in_place_activations_drops_the_whole_branch(tmp_path):
    """torch.export writes ReLU(inplace=True) as relu_, which fx's dead-code pass keeps as impure;
    a dropped branch must go entirely. The program is exported with its example's batch fixed,
    so loading must also let it run batches."""
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(_ChainNet(2, inplace=True).eval(), (torch.randn(1, 3, 8, 8),)), path)
    model = gp.load(path)
    x = torch.randn(3, 3, 8, 8)
    assert model.run(x).shape == (3, 2)
    blocks = gp.find_blocks(model)
    assert len(blocks) == 2
    for order in (blocks, blocks[::-1], blocks[:1]):
        dropped = gp.drop_blocks(model, [b.name for b in order], blocks)
        left = {n.name for n in dropped.graph_module.graph.nodes}
        assert not left & {name for b in order for name in b.branch}
        reference = model
        for block in order:
            reference = zero_branch(reference, block)
        assert torch.allclose(dropped.run(x), reference.run(x), atol=1e-6)
