"""A YOLOv8-style detector (C2f blocks whose entry is a Split output, one (batch, 4 + classes,
anchors) output, imgsz in the metadata): blocks found, every estimator scores, drop equals
zeroing the branch, the written file matches, and optimize runs with tiny settings."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.backends.base import LatencySettings
from graphprune.data import TinySet
from graphprune.ops import is_multi_output
from graphprune.passes import zero_branch
from graphprune.passes.recover import RecoverySettings
from graphprune.passes.recoverability import ESTIMATORS, RecoverabilitySettings, score_blocks
from graphprune.passes.refine_selection import RefineSettings
from onnx_builders import save
from yolo_like import tiny_yolo_onnx

C2F_BLOCKS = ["stage1.1.m.0", "stage1.1.m.1", "stage2.1.m.0"]


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    path = save(tiny_yolo_onnx(), tmp_path_factory.mktemp("yolo") / "yolo.onnx")
    return path, gp.load(path)


def _images(n, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(n, size=64, seed=0):
    return TinySet(_images(n, size, seed), -torch.ones(n, dtype=torch.long))


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_c2f_blocks_are_found_at_the_split_output(yolo):
    _, model = yolo
    blocks = gp.find_blocks(model)
    assert [b.name for b in blocks] == C2F_BLOCKS
    assert [b.kind for b in blocks] == ["identity"] * 3
    nodes = {n.name: n for n in model.graph_module.graph.nodes}
    first = nodes[blocks[0].entry]  # the Split's second half, read by the bottleneck, its add and the concat
    assert first.args[0].meta["onnx_op"] == "Split" and not is_multi_output(first)
    assert blocks[0].input_shape == blocks[0].output_shape == (1, 8, 16, 16)
    assert model.meta["input_shape_source"] == "metadata:imgsz" and model.input_shape == (1, 3, 64, 64)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_scores_the_c2f_blocks(yolo, estimator):
    _, model = yolo
    settings = RecoverabilitySettings(estimator=estimator, iterations=4, batch_size=8)
    scores = score_blocks(model, gp.find_blocks(model), _tiny(16), _tiny(8, seed=1), settings, show_progress=False)
    assert [s.name for s in scores] == C2F_BLOCKS
    assert all(np.isfinite(s.recoverability) and s.recoverability > 0 for s in scores)
    if estimator in ("practise", "lstsq"):  # fitted adaptors do no worse than none on held-out images
        assert all(s.recoverability <= s.before_fit for s in scores)


def test_dropping_a_c2f_block_equals_zeroing_it_and_is_written(yolo, tmp_path):
    path, model = yolo
    blocks = gp.find_blocks(model)
    x = _images(2, seed=2)
    for block in blocks:
        dropped, zeroed = gp.drop_blocks(model, [block.name], blocks), zero_branch(model, block)
        assert torch.allclose(dropped.run(x), zeroed.run(x), atol=1e-4), block.name
    smaller = gp.drop_blocks(model, ["stage1.1.m.1"], blocks)
    out = tmp_path / "smaller.onnx"
    gp.save(smaller, out)
    assert np.allclose(_ort(out, x), smaller.run(x).numpy(), atol=1e-4)
    assert _ort(out, _images(1, size=96)).shape == (1, 7, 24 * 24 + 12 * 12)  # still any size
    written = onnx.load(str(out))
    keys = [p.key for p in written.metadata_props]
    assert "imgsz" in keys and not any(k.startswith("onnxsim.") for k in keys)


def test_optimize_with_tiny_settings_drops_a_c2f_block(yolo, tmp_path):
    _, model = yolo
    config = gp.OptimizeConfig(
        latency_cut=0.02, margin=0.0, holdout_minimum=8, show_progress=False, quantize="none",
        latency=LatencySettings(warmup_runs=1, warmup_s=0.0, min_runs=3, min_time_s=0.0),
        recoverability=RecoverabilitySettings(iterations=3, batch_size=8),
        refine=RefineSettings(max_evaluations=0), recovery=RecoverySettings(iterations=3, batch_size=8))
    result = gp.optimize(model, _tiny(24), config)
    assert result.report["dropped"] and set(result.report["dropped"]) <= set(C2F_BLOCKS)
    out = tmp_path / "fast.onnx"
    gp.save(result.model, out)
    x = _images(2, seed=3)
    assert np.allclose(_ort(out, x), result.model.run(x).numpy(), atol=1e-3)


class SplitShortcut(nn.Module):
    """``a, b = split(x); a + conv(b)``: a block whose entry is the Split itself (a tuple)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.stem(x).split((4, 4), 1)
        y = torch.relu(a + self.body(b))
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def split_shortcut(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("split") / "split.onnx"
    torch.onnx.export(SplitShortcut().eval(), (torch.randn(1, 3, 16, 16),), str(path), opset_version=17,
                      dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return gp.load(path)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_block_entered_at_a_tuple_is_scored(split_shortcut, estimator):
    model = split_shortcut
    (block,) = gp.find_blocks(model)
    nodes = {n.name: n for n in model.graph_module.graph.nodes}
    assert is_multi_output(nodes[block.entry]) and block.kind == "shortcut"
    settings = RecoverabilitySettings(estimator=estimator, iterations=4, batch_size=8)
    (score,) = score_blocks(model, [block], _tiny(16, 16), _tiny(8, 16, seed=1), settings, show_progress=False)
    assert np.isfinite(score.recoverability) and score.recoverability > 0
