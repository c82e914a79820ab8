"""A network whose residual blocks cannot reach the target offers its plain layers too
(passes/add_layers.py): the layer units outside every block (find_blocks(layers=True),
outside_layers), dropped alongside blocks exactly, each a region of its own for the adaptors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from conftest import export_onnx, optimized_file_agrees, seeded_module
from graphprune.passes import AddLayers, Blocks, PassContext, zero_branch
from graphprune.passes.adaptor_fit import adaptor_sites, shape_region
from graphprune.passes.find_blocks import outside_layers


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1))

    def forward(self, x):
        return torch.relu(x + self.branch(x))


class PlainThenResidual(nn.Module):
    """A plain backbone (two stride-1 layers) then a residual block of the same shape, as a
    detector's LCNet backbone before its residual neck."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU())  # reads the input: no unit
        self.l1 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.l2 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = Residual(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())  # changes the shape: no unit
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.down(self.res(self.l2(self.l1(self.stem(x))))).mean((2, 3)))


class Zero(nn.Module):
    def forward(self, x):
        return x * 0


def _model(source, tmp_path):
    net = seeded_module(PlainThenResidual)
    if source == "torch":
        return net, gp.load(net, input_shape=(1, 3, 32, 32))
    return net, gp.load(export_onnx(net, (1, 3, 32, 32), tmp_path / "plain_res.onnx", opset=17))


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_the_layers_outside_the_blocks_are_found_and_the_blocks_keep_their_names(source, tmp_path):
    _, model = _model(source, tmp_path)
    blocks = gp.find_blocks(model)
    assert [b.kind for b in blocks] == ["identity"]  # a residual network keeps exactly its blocks by default
    both = gp.find_blocks(model, layers=True)
    assert [b.kind for b in both] == ["layer", "layer", "identity"] and both[2] == blocks[0]
    assert outside_layers(model, blocks) == both[:2]
    assert outside_layers(model, both[:2]) == []  # layers are the candidates already
    if source == "torch":
        assert [b.name for b in both] == ["l1.0", "l2.0", "res"]


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_a_layer_and_the_block_after_it_drop_together_exactly(source, tmp_path):
    net, model = _model(source, tmp_path)
    layer1, layer2, block = gp.find_blocks(model, layers=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(net)
    reference.l2, reference.res.branch = nn.Identity(), Zero()
    for order in ([layer2, block], [block, layer2]):  # either order of the names
        dropped = gp.drop_blocks(model, [b.name for b in order], [layer1, layer2, block])
        assert torch.allclose(dropped.run(x), reference(x), atol=1e-5)
    assert torch.allclose(gp.drop_blocks(model, [layer2.name], [layer1, layer2, block]).run(x),
                          zero_branch(model, layer2).run(x), atol=1e-6)


def test_a_layer_is_a_region_of_its_own_beside_a_block_of_its_shape():
    net = seeded_module(PlainThenResidual)
    model = gp.load(net, input_shape=(1, 3, 32, 32))
    blocks = gp.find_blocks(model, layers=True)
    layer2, block = blocks[1], blocks[2]
    assert block.entry == layer2.exit and block.output_shape == layer2.output_shape
    assert shape_region(blocks, block) == [block] and shape_region(blocks, layer2) == [layer2]
    # the block gone: one adaptor where it was; the layer gone: one where it was, and none on a branch
    assert adaptor_sites(model.graph_module, blocks, [block], block) == \
        [(block.exit, [u.name for u in model.graph_module.graph.find_nodes(op="call_module", target="down.0")])]


def _add(model, mode, monkeypatch, cut=None, target=0.3):
    from graphprune.passes import add_layers

    def measured(self, model, ctx, inputs, blocks):
        if cut is None:
            pytest.fail("measured where nothing needed measuring")
        return cut

    monkeypatch.setattr(add_layers.AddLayers, "_every_block_dropped", measured)
    blocks = Blocks(gp.find_blocks(model))
    return AddLayers(mode)(model, PassContext(model, latency_cut=target, margin=0.01), blocks)


def test_auto_adds_the_layers_only_where_every_block_dropped_falls_short_of_the_goal(monkeypatch):
    model = gp.load(seeded_module(PlainThenResidual), input_shape=(1, 3, 32, 32))
    short = _add(model, "auto", monkeypatch, cut=0.12)
    assert [b.name for b in short.value] == ["l1.0", "l2.0", "res"] and short.record["added"] == ["l1.0", "l2.0"]
    assert short.record["blocks_dropped_cut"] == 0.12 and short.record["goal"] == pytest.approx(0.31)
    enough = _add(model, "auto", monkeypatch, cut=0.32)
    assert [b.name for b in enough.value] == ["res"] and enough.record["reason"] == \
        "every block dropped cuts 32.0%, the goal is 31.0%"
    assert [b.name for b in _add(model, "always", monkeypatch).value] == ["l1.0", "l2.0", "res"]
    assert [b.name for b in _add(model, "never", monkeypatch).value] == ["res"]
    plain = gp.load(seeded_module(PlainOnly), input_shape=(1, 3, 32, 32))
    assert _add(plain, "always", monkeypatch).record["reason"].startswith("no residual block")
    with pytest.raises(gp.GraphpruneError, match="layers must be one of auto, always, never, got 'some'"):
        gp.OptimizeConfig(layers="some")


class PlainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.l1 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.l1(self.stem(x).relu()).relu().mean((2, 3)))


@pytest.mark.slow  # about 10 s
def test_optimize_ranks_layers_beside_blocks_and_writes_what_onnxruntime_runs(tmp_path):
    from dataclasses import replace

    from test_vit import FAST_CONFIG

    _, model = _model("onnx", tmp_path)
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert gp.OptimizeConfig().layers == "never"  # the layers are the user's choice (passes/add_layers.py)
    result = optimized_file_agrees(model, images, replace(FAST_CONFIG, layers="always"), tmp_path / "fast.onnx")
    assert [b["kind"] for b in result.report["blocks"]] == ["layer", "layer", "identity"]
    assert result.report["layers_outside_blocks"]["added"] == [b["name"] for b in result.report["blocks"][:2]]


def test_inspect_names_the_layers_outside_the_blocks(cli, tmp_path):
    import json

    _, model = _model("onnx", tmp_path)
    path = tmp_path / "plain_res.onnx"
    code, stdout, _ = cli("inspect", path)
    assert code == 0 and "1 residual blocks" in stdout and "2 layers outside the blocks keep their shape" in stdout
    code, stdout, _ = cli("inspect", path, "--json")
    found = json.loads(stdout)
    assert [b["kind"] for b in found["blocks"]] == ["identity"]
    assert [b["name"] for b in found["layers_outside_blocks"]] == [b.name for b in gp.find_blocks(model, layers=True)[:2]]


def test_a_target_the_blocks_cannot_reach_names_the_layers_left_out(monkeypatch):
    from dataclasses import replace

    from graphprune.passes import CheckReachable, Pipeline
    from test_check_reachable import _fake_measure, _profiled

    model = gp.load(seeded_module(PlainThenResidual), input_shape=(1, 3, 32, 32))
    tiny = gp.data.TinySet(torch.randn(24, 3, 32, 32), torch.arange(24) % 10)
    for layers, hint in (("never", True), ("auto", False)):
        state, ctx = _profiled(model, tiny, 0.5)
        ctx.config = replace(ctx.config, layers=layers)
        _fake_measure(monkeypatch, 0.1)
        with pytest.raises(gp.GraphpruneError) as exc:
            Pipeline([CheckReachable()]).run(model, ctx, state)
        assert ("; the 2 plain layers outside the blocks may reach it (--layers auto)" in str(exc.value)) == hint
