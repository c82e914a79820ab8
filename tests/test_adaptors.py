"""Adaptors: inserting one changes nothing; folding a trained one is exact and removes it."""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.adaptors import Adaptor, fold_adaptors, insert_adaptor, remove_adaptors
from onnx_builders import residual_onnx, save


def _nodes(model, name):
    return {n.name: n for n in model.graph_module.graph.nodes}[name]


def test_identity_adaptor_changes_nothing_and_can_be_removed():
    model = gp.load("zoo:cifar10_resnet20")
    block = gp.find_blocks(model)[1]
    x = torch.randn(2, 3, 32, 32)
    before = model.run(x)
    copy = model.clone()
    gm = copy.graph_module
    producer = _nodes(copy, block.branch_output)
    insert_adaptor(gm, producer, [_nodes(copy, block.merge)], 16, 1, "a0")
    gm.recompile()
    assert sum(isinstance(m, Adaptor) for m in gm.modules()) == 1
    assert torch.allclose(copy.run(x), before, atol=1e-6)
    remove_adaptors(gm)
    assert len(gm.graph.nodes) == len(model.graph_module.graph.nodes)


def test_trained_adaptors_fold_exactly_into_convs(tmp_path):
    model = gp.load(save(residual_onnx(), tmp_path / "m.onnx"))  # ONNX: convs without BatchNorm
    gm = model.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    (block,) = gp.find_blocks(model)
    conv2 = nodes[block.branch_output]  # the second conv writes the branch output
    conv1 = [n for n in (nodes[b] for b in block.branch) if n.meta.get("onnx_op") == "Conv"][0]
    after_writer = insert_adaptor(gm, conv2, [nodes[block.merge]], 4, 1, "out_adaptor")
    before_reader = insert_adaptor(gm, conv1.args[0], [conv1], 4, 1, "in_adaptor")
    torch.manual_seed(0)
    for node in (after_writer, before_reader):
        gm.get_submodule(node.target).weight.data += 0.3 * torch.randn(4, 4)
    gm.recompile()
    x = torch.randn(3, 4, 8, 8)
    with_adaptors = model.run(x)
    assert fold_adaptors(gm) == []
    assert not any(isinstance(m, Adaptor) for m in gm.modules())
    assert torch.allclose(model.run(x), with_adaptors, atol=1e-5)
    out = tmp_path / "folded.onnx"
    gp.save(model, out)  # folded weights lower back into the ONNX graph
    assert torch.allclose(gp.load(out).run(x), with_adaptors, atol=1e-5)
