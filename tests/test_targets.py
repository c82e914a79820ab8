"""Mimicking targets (graphprune.features): the inputs of the last trained layers behind every
output, fixed-weight layers looked through, found again in a pruned model through their reader,
and weighted so that no target dominates by its scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.data import TinySet
from graphprune.model import first_tensor
from graphprune.features import (Target, last_trained_layers, mimic_loss, mimic_targets, run_batched,
                                 target_names, target_weights, truncate)
from graphprune.passes.recover import RecoverySettings, recover
from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks
from onnx_builders import save
from yolo_like import tiny_yolo_onnx


@pytest.fixture(scope="module")
def dfl_yolo(tmp_path_factory):
    return gp.load(save(tiny_yolo_onnx(reg=4), tmp_path_factory.mktemp("dfl") / "dfl.onnx"))


def _onnx_names(model, names):
    nodes = {n.name: n for n in model.graph_module.graph.nodes}
    return [nodes[n].meta.get("onnx_name") for n in names]


def test_a_classifier_has_one_target_the_input_of_its_last_linear():
    model = gp.load("zoo:cifar10_resnet20")
    (target,) = mimic_targets(model)
    nodes = {n.name: n for n in model.graph_module.graph.nodes}
    assert nodes[target.reader].target == "linear" and target.node == "flatten"


def test_a_detector_mimics_its_box_and_class_branches_at_every_scale_past_the_dfl(dfl_yolo):
    layers = _onnx_names(dfl_yolo, [n.name for n in last_trained_layers(dfl_yolo)])
    # the last conv of each branch at both scales; the DFL's integral conv (weights 0..3) is looked through
    assert sorted(layers) == sorted(f"/head/{branch}.{scale}/{branch}.{scale}.1/Conv"
                                    for branch in ("box", "cls") for scale in (0, 1))
    targets = mimic_targets(dfl_yolo)
    assert len(targets) == 4 and {t.reader for t in targets} == {n.name for n in last_trained_layers(dfl_yolo)}
    values = run_batched(truncate(dfl_yolo.graph_module, [t.node for t in targets]), torch.randn(2, 3, 64, 64))
    assert sorted(v.shape[1:] for v in values) == sorted([(16, 16, 16)] * 2 + [(16, 8, 8)] * 2)


def test_feature_node_takes_a_comma_separated_list_and_refuses_unknown_nodes(dfl_yolo):
    names = [t.node for t in mimic_targets(dfl_yolo)][:2]
    onnx_names = _onnx_names(dfl_yolo, names)
    assert [t.node for t in mimic_targets(dfl_yolo, ", ".join(onnx_names))] == names
    with pytest.raises(gp.GraphpruneError, match="'nope' is not a node"):
        mimic_targets(dfl_yolo, f"{onnx_names[0]},nope")


def test_outputs_without_a_trained_layer_behind_them_are_one_line():
    fixed = nn.Conv2d(3, 2, 1, bias=False)
    fixed.weight.data[:] = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    model = gp.load(nn.Sequential(fixed, nn.ReLU()), input_shape=(1, 3, 4, 4))
    with pytest.raises(gp.GraphpruneError, match="no trained layer"):
        mimic_targets(model)


class HeadOnBlock(nn.Module):
    """conv -> residual block -> 1x1 head: the head reads the block's output directly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.head(y + self.body(y))


def test_a_target_a_dropped_block_computed_is_what_its_reader_reads_in_the_pruned_model():
    torch.manual_seed(0)
    model = gp.load(HeadOnBlock().eval(), input_shape=(1, 3, 8, 8))
    (target,) = mimic_targets(model)
    (block,) = gp.find_blocks(model)
    assert target.node == block.exit
    pruned = gp.drop_blocks(model, [block.name])
    (name,) = target_names(pruned.graph_module, [target])
    x = torch.randn(2, 3, 8, 8)
    # what the head now reads: the block's input, relu(stem(x))
    assert torch.allclose(run_batched(truncate(pruned.graph_module, name), x),
                          torch.relu(model.graph_module.stem(x)), atol=1e-6)
    with pytest.raises(gp.GraphpruneError, match="gone from the pruned model"):
        target_names(pruned.graph_module, [Target(block.exit)])  # no reader to find it by


class Embedder(nn.Module):
    """conv -> two residual blocks -> global pool: a feature extractor, no trained layer after its
    last block; ``with_logits`` adds a linear classifier on the pooled features, a second output."""

    def __init__(self, with_logits: bool = False):
        super().__init__()
        conv = lambda: nn.Conv2d(8, 8, 3, padding=1)  # noqa: E731
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(conv(), nn.ReLU(), conv()) for _ in range(2))
        self.fc = nn.Linear(8, 4) if with_logits else None

    def forward(self, x):
        y = torch.relu(self.stem(x))
        for block in self.blocks:
            y = torch.relu(y + block(y))
        features = y.mean((2, 3))
        return features if self.fc is None else (features, self.fc(features))


@pytest.mark.parametrize("with_logits", [False, True])
def test_a_feature_extractor_mimics_its_output_which_dropping_its_last_block_leaves(with_logits):
    """Every block's last conv reaches the pooled output through the residual adds; their inputs,
    the targets before, vanished with a dropped last block ("the mimicked tensor is gone"). The
    output itself is the target now; a classifier on it adds nothing (its input is that output)."""
    torch.manual_seed(0)
    model = gp.load(Embedder(with_logits).eval(), input_shape=(1, 3, 8, 8))
    (target,) = mimic_targets(model)
    pooled = model.graph_module.graph.output_node().all_input_nodes[0]
    assert target.node == pooled.name
    blocks = gp.find_blocks(model)
    pruned = gp.drop_blocks(model, [blocks[-1].name], blocks)
    images = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tiny = TinySet(images, -torch.ones(32, dtype=torch.long))
    settings = RecoverySettings(iterations=30, batch_size=8, lr=3e-3, augment="none")
    recovered, record = recover(pruned, model, tiny, settings, show_progress=False)
    teacher = first_tensor(run_batched(model.graph_module, tiny.images))
    before, after = (F.mse_loss(first_tensor(run_batched(m.graph_module, tiny.images)), teacher)
                     for m in (pruned, recovered))
    assert after < before


def test_targets_are_weighted_by_their_scale_and_one_target_is_its_mse():
    small = torch.randn(64, 4)
    large = 100 * small
    weights = target_weights([small, large])
    assert weights[0] * float(small.pow(2).mean()) == pytest.approx(weights[1] * float(large.pow(2).mean()), rel=1e-5)
    off = [small + 0.1, large + 10.0]  # the same relative error on both
    total = float(mimic_loss(off, [small, large], weights))
    parts = [w * float(F.mse_loss(o, t)) for o, t, w in zip(off, [small, large], weights)]
    assert parts[0] == pytest.approx(parts[1], rel=1e-4) and total == pytest.approx(sum(parts) / 2)
    assert target_weights([large]) == [1.0]
    assert float(mimic_loss([off[1]], [large], [1.0])) == pytest.approx(float(F.mse_loss(off[1], large)))


def test_scoring_and_recovery_of_a_detector_use_every_target(dfl_yolo):
    blocks = gp.find_blocks(dfl_yolo)
    gen = torch.Generator().manual_seed(0)
    train = TinySet(torch.randn(24, 3, 64, 64, generator=gen), -torch.ones(24, dtype=torch.long))
    holdout = TinySet(torch.randn(8, 3, 64, 64, generator=gen), -torch.ones(8, dtype=torch.long))
    settings = RecoverabilitySettings(iterations=10, batch_size=8)
    scores = score_blocks(dfl_yolo, blocks, train, holdout, settings, show_progress=False)
    # the best checkpoint is kept, so a fit never ends above no fit on the held-out images
    assert all(0 < s.recoverability <= s.before_fit for s in scores)
    pruned = gp.drop_blocks(dfl_yolo, [blocks[0].name], blocks)
    recovered, record = recover(pruned, dfl_yolo, train, RecoverySettings(iterations=30, batch_size=8, lr=1e-3,
                                                                          augment="none"), show_progress=False)
    assert len(record["mimicked_nodes"]["original"]) == 4 and record["targets"] == [t.node for t in mimic_targets(dfl_yolo)]
    losses = [point["loss"] for point in record["loss_curve"]]
    assert sum(losses[-5:]) < sum(losses[:5])
    x = holdout.images
    error = [float(F.mse_loss(m.run(x), dfl_yolo.run(x))) for m in (pruned, recovered)]
    assert error[1] < error[0]  # the detector's output itself moved towards the original's
