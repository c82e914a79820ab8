"""A fixed-batch export whose batch is folded into products of constant sizes (torch's attention:
[L, N*heads, E/heads], [L*N, E]) runs batches once the trace finds the sizes that hold it
(graphprune/formats/batch_trace.py); a graph whose rows truly mix stays refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.optimize import image_input_shape
from graphprune.formats.batch_trace import (ConcatRepeatingConstants, GatherEachImage, ReshapeToBatched, _axes_holding,
                                             _batch_stride, _Seen)
from test_vit import SHAPE, small_vit


@pytest.fixture(scope="module")
def fixed_batch_vit(tmp_path_factory):
    """What ``torch.onnx.export(vit, (x,), path)`` writes by default: the dynamo exporter, batch 1."""
    path = tmp_path_factory.mktemp("vit") / "vit_fixed.onnx"
    torch.onnx.export(small_vit(), (torch.randn(SHAPE),), str(path), dynamo=True, verbose=False)
    return path


def _rows_match_onnxruntime(model, path, x: torch.Tensor) -> None:
    together = model.run(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(len(x)):
        (alone,) = session.run(None, {name: x[i:i + 1].numpy()})
        np.testing.assert_allclose(together[i:i + 1].numpy(), alone, rtol=1e-4, atol=1e-4)


def test_attention_exported_at_batch_one_runs_batches(fixed_batch_vit):
    proto = onnx.load(str(fixed_batch_vit), load_external_data=False)
    folded = [list(numpy_helper.to_array(t)) for t in proto.graph.initializer if list(t.dims) == [3]]
    assert [17, 2, 16] in folded  # the export did fold the batch into attention's sizes
    model = gp.load(fixed_batch_vit)
    assert model.meta["batches_run"] is True
    modules = [type(m) for m in model.graph_module.modules()]
    assert ReshapeToBatched in modules and ConcatRepeatingConstants in modules  # the class token
    _rows_match_onnxruntime(model, fixed_batch_vit, torch.randn(3, *SHAPE[1:]))


def test_windowed_attention_exported_at_batch_one_runs_batches(tmp_path):
    """A small Swin: windows folded with the batch ([1 * 4 windows, 16, C]) and its head's flatten
    written as as_strided (Reshape [-1] then Gather with constant indices)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()
    path = tmp_path / "swin.onnx"
    torch.onnx.export(swin, (torch.randn(SHAPE),), str(path), dynamo=True, verbose=False)
    model = gp.load(path)
    assert model.meta["batches_run"] is True
    assert GatherEachImage in [type(m) for m in model.graph_module.modules()]
    _rows_match_onnxruntime(model, path, torch.randn(3, *SHAPE[1:]))


def test_the_trace_goes_back_when_a_choice_fails_downstream(tmp_path):
    """X (1, 4, 6) -> Transpose -> (4, 1, 6) -> Reshape [4, 6] -> MatMul W (6, 5) -> Reshape
    [4, 1, 5] -> Transpose -> (1, 4, 5). At batch B the first Reshape may be (4B, 6) or (4, 6B):
    both regroup the same memory; the option tried first, (4, 6B), fails at the MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([4, 6], np.int64), "flat"),
             numpy_helper.from_array(np.array([4, 1, 5], np.int64), "rows")]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["X"], ["t"], perm=[1, 0, 2]),
         helper.make_node("Reshape", ["t", "flat"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["m"]),
         helper.make_node("Reshape", ["m", "rows"], ["r"]),
         helper.make_node("Transpose", ["r"], ["Y"], perm=[1, 0, 2])],
        "folded", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 5])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    onnx.save(proto, str(tmp_path / "folded.onnx"))
    assert _axes_holding(6, [4, 6]) == [1, 0]  # the outermost-part option comes first
    model = gp.load(tmp_path / "folded.onnx")
    assert model.meta["batches_run"] is True
    sizes = sorted(m.sizes for m in model.graph_module.modules() if isinstance(m, ReshapeToBatched))
    assert sizes == [[-1, 6], [4, -1, 5]]
    _rows_match_onnxruntime(model, tmp_path / "folded.onnx", torch.randn(3, 4, 6))


def _seen(one: torch.Tensor, other: torch.Tensor) -> _Seen:
    positions = torch.arange(one.numel())
    return _Seen(tuple(one.shape), positions, one.reshape(-1), other.reshape(-1))


def test_the_batch_stride_is_where_two_images_interleave():
    one, other = torch.randn(17, 1, 32), torch.randn(17, 1, 32)
    assert _batch_stride(torch.cat([one, other], 1), _seen(one, other)) == 32
    assert _batch_stride(torch.cat([one, other], 0), _seen(one, other)) == 17 * 32
    assert _batch_stride(one, _seen(one, one.clone())) is None  # a constant holds no batch
    assert _batch_stride(torch.cat([one, one], 1), _seen(one, other)) is False  # the rows are not the images'


@pytest.mark.slow  # 15 s: optimize end to end, then the output through onnxruntime
def test_optimize_writes_a_fixed_batch_vit_that_onnxruntime_runs(cli, fixed_batch_vit, tmp_path):
    out = tmp_path / "fast.onnx"
    code, _, err = cli("optimize", fixed_batch_vit, "--latency-cut", "0.2", "--data-free", "--synthetic", "procedural",
                       "--num-samples", "24", "--score-iterations", "3", "--refine-evaluations", "0",
                       "--recovery-iterations", "3", "--quantize", "none", "--min-time", "0.05", "--no-cache",
                       "-o", out)
    assert code == 0, err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]  # written with the batch it was given
    (y,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})
    assert y.shape == (1, 10)
    assert len(onnx.load(str(out)).graph.node) < len(onnx.load(str(fixed_batch_vit)).graph.node)


class KeepsPositive(torch.nn.Module):
    """A conv, then the sum of its positive outputs, picked by NonZero (how an ultralytics nms=True
    export picks its candidate boxes): the sizes after NonZero follow the image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).reshape(-1)
        return y[torch.nonzero(y > 0)[:, 0]].sum().reshape(1, 1) + self.conv(x).mean((2, 3))


def test_a_graph_whose_sizes_follow_its_values_is_not_traced(tmp_path, monkeypatch):
    from graphprune.formats import batch_trace

    path = tmp_path / "nonzero.onnx"
    torch.onnx.export(KeepsPositive().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    assert any(node.op_type == "NonZero" for node in onnx.load(str(path)).graph.node)
    model = gp.load(path)
    assert model.meta["batches_run"] is False  # the sum mixes a batch's images: refused, as before

    def no_trace(*args, **kwargs):
        raise AssertionError("traced a graph whose sizes follow its values")

    monkeypatch.setattr(batch_trace, "_Trace", no_trace)  # the search gave up only after its restarts (294 s)
    assert batch_trace.trace_folded_batch(model) is None
    assert model.meta["sizes_follow_values"] is True
    with pytest.raises(gp.GraphpruneError, match="holds NonZero or NonMaxSuppression.*without NMS"):
        image_input_shape(model)


class _Scaled:
    """A stand-in model: 1e12 * x, a batch's float noise (1e5, 1e-7 of the scale) or mixed rows."""

    def __init__(self, mix: bool):
        self.mix = mix

    def example_inputs(self, batch_size=1, seed=0):
        return [torch.tensor([[1.0 + seed, 0.0]])]

    def run(self, x):
        if x.shape[0] == 1:
            return x * 1e12
        return x.flip(0) * 1e12 if self.mix else x * 1e12 + 1e5


def test_batch_consistency_is_judged_at_the_outputs_scale():
    """An untrained mobileone_s0's logits reach 1e12, where a batch's float32 sums differ from its
    rows' by 1e5 near a zero logit: not a fixed batch. Rows that mix still are."""
    from graphprune.formats.batch_axis import batch_consistent

    assert batch_consistent(_Scaled(mix=False))
    assert not batch_consistent(_Scaled(mix=True))


class _LinearNorm(torch.nn.Module):
    """LeViT's Linear + BatchNorm1d over the tokens of every image: bn(x.flatten(0, 1)).reshape_as(x)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear, self.bn = torch.nn.Linear(cin, cout, bias=False), torch.nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _MiniLevit(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mlp, self.head = torch.nn.Conv2d(3, 8, 4, 4), _LinearNorm(8, 8), _LinearNorm(8, 8)
        with torch.no_grad():  # statistics of their own, as trained ones are
            for bn in (self.mlp.bn, self.head.bn):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.mlp(torch.relu(x))
        return self.head(x).mean(1)


def test_a_batch_folded_before_a_batch_norm_is_traced_in_eval_mode(tmp_path):
    """LeViT exported at batch 1: the trace ran the graph in training mode, where BatchNorm1d refuses
    one row ('Expected more than 1 value per channel'), so optimize refused the model as batch-fixed."""
    torch.manual_seed(0)
    path = tmp_path / "levit.onnx"
    torch.onnx.export(_MiniLevit().eval(), (torch.randn(1, 3, 16, 16),), str(path), opset_version=17, dynamo=False)
    model = gp.load(path)
    assert model.meta["batches_run"] is True
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(model.run(x), torch.cat([model.run(x[i:i + 1]) for i in range(3)]), atol=1e-5)
