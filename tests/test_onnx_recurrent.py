"""ONNX LSTM and GRU converted by graphprune (formats/onnx_recurrent.py): a CRNN-style recogniser
loads, runs as onnxruntime runs it, has its recurrent weights trained and written back, and loses
a residual block like any other model."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphprune as gp
from graphprune.errors import GraphpruneError
from graphprune.formats.model_io import to_onnx
from graphprune.formats.onnx_recurrent import OnnxRecurrent
from onnx_builders import save


class TinyCrnn(nn.Module):
    """Convolutions with one residual block, the map's columns read by a bidirectional LSTM (or a
    GRU, batch first), a classifier per column: (N, 1, 16, W) -> (N, W / 2, classes)."""

    def __init__(self, recurrent: str = "LSTM", sequence_first: bool = False):
        super().__init__()
        self.sequence_first = sequence_first  # (T, N, classes) out, as PyTorch's CTC loss takes it
        self.stem = nn.Conv2d(1, 8, 3, 2, 1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1))
        self.gru = recurrent == "GRU"
        self.rnn = (nn.GRU(8 * 8, 12, batch_first=True, bidirectional=True) if self.gru
                    else nn.LSTM(8 * 8, 12, bidirectional=True))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x).relu()
        x = (x + self.block(x)).relu()
        columns = x.flatten(1, 2).permute(0, 2, 1) if self.gru else x.flatten(1, 2).permute(2, 0, 1)
        y, _ = self.rnn(columns)
        return self.fc(y if self.gru or self.sequence_first else y.transpose(0, 1))


def crnn_onnx(recurrent: str = "LSTM", seed: int = 0, sequence_first: bool = False) -> onnx.ModelProto:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.onnx.export(TinyCrnn(recurrent, sequence_first).eval(), (torch.randn(1, 1, 16, 32),), buffer, opset_version=17,
                      dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _onnxruntime(path, x: torch.Tensor, name: str = "x") -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x.numpy()})[0]


@pytest.mark.parametrize("recurrent", ["LSTM", "GRU"])
def test_a_recurrent_recogniser_converts_and_runs_as_onnxruntime_does(tmp_path, recurrent):
    # was refused: "unsupported ONNX ops in common.onnx: LSTM-13" (ddddocr's recogniser)
    proto = crnn_onnx(recurrent)
    assert any(n.op_type == recurrent for n in proto.graph.node)
    path = save(proto, tmp_path / "crnn.onnx")
    model = gp.load(path)
    assert [type(m) for m in model.graph_module.modules() if isinstance(m, OnnxRecurrent)] == [OnnxRecurrent]
    x = torch.randn(3, 1, 16, 32)
    assert np.allclose(model.run(x).numpy(), _onnxruntime(path, x), atol=1e-5)
    links = {link.initializer for key, link in model.onnx.weight_links.items() if ".W" in key or ".R" in key}
    node = next(n for n in model.onnx.proto.graph.node if n.op_type == recurrent)
    assert links == {node.input[1], node.input[2]}  # W and R written back to their initializers


def test_trained_recurrent_weights_are_written_back(tmp_path):
    model = gp.load(save(crnn_onnx(), tmp_path / "crnn.onnx"))
    rnn = next(m for m in model.graph_module.modules() if isinstance(m, OnnxRecurrent))
    with torch.no_grad():  # what recovery's steps do to them
        for parameter in (rnn.W, rnn.R, rnn.B):
            parameter.add_(0.05 * torch.randn_like(parameter))
    written = save(to_onnx(model), tmp_path / "written.onnx")
    x = torch.randn(2, 1, 16, 32)
    assert np.allclose(model.run(x).numpy(), _onnxruntime(written, x), atol=1e-5)
    assert not np.allclose(_onnxruntime(written, x), _onnxruntime(tmp_path / "crnn.onnx", x), atol=1e-3)


def test_a_residual_block_before_the_lstm_is_dropped_and_written(tmp_path):
    model = gp.load(save(crnn_onnx(), tmp_path / "crnn.onnx"))
    blocks = gp.find_blocks(model)
    assert len(blocks) == 1
    dropped = gp.drop_blocks(model, [blocks[0].name], blocks)
    proto = to_onnx(dropped)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 1 and any(n.op_type == "LSTM" for n in proto.graph.node)
    x = torch.randn(2, 1, 16, 32)
    assert np.allclose(dropped.run(x).numpy(), _onnxruntime(save(proto, tmp_path / "d.onnx"), x), atol=1e-5)


def _recurrent_node_onnx(kind: str, direction: str, layout: int, **extra) -> onnx.ModelProto:
    """X -> one LSTM/GRU node with bias and a given initial state, opset 14; outputs Y and Y_h."""
    rng = np.random.default_rng(0)
    gates, hidden, size, steps, batch = (4 if kind == "LSTM" else 3), 5, 3, 6, 2
    directions = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name) for name, shape in
             (("W", (directions, gates * hidden, size)), ("R", (directions, gates * hidden, hidden)),
              ("B", (directions, 2 * gates * hidden)))]
    state = [directions, batch, hidden] if layout == 0 else [batch, directions, hidden]
    if extra.pop("sequence_lens", False):
        inits.append(numpy_helper.from_array(np.full(batch, steps, np.int32), "lens"))
    inputs = ["X", "W", "R", "B", "lens" if inits[-1].name == "lens" else "", "H0"]
    attributes = {"linear_before_reset": 1} if kind == "GRU" else {}
    attributes.update(extra)
    attributes = {"hidden_size": hidden, "direction": attributes.pop("node_direction", direction), **attributes}
    node = helper.make_node(kind, inputs, ["Y", "Y_h"], layout=layout, **attributes)
    x_shape = [steps, batch, size] if layout == 0 else [batch, steps, size]
    y_shape = [steps, directions, batch, hidden] if layout == 0 else [batch, steps, directions, hidden]
    graph = helper.make_graph([node], "recurrent", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape),
                                                    helper.make_tensor_value_info("H0", TensorProto.FLOAT, state)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape),
                               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, state)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind, direction, layout", [("LSTM", "reverse", 0), ("LSTM", "bidirectional", 1),
                                                     ("GRU", "reverse", 1), ("GRU", "forward", 0)])
def test_each_direction_and_layout_is_computed_as_onnx_defines_it(kind, direction, layout):
    """Against onnxruntime, which runs layout 0 only: a layout-1 node against the same weights at
    layout 0, its inputs and outputs transposed (batch first)."""
    from onnx2torch import convert

    from graphprune.formats.onnx_converters import register

    directions = 2 if direction == "bidirectional" else 1
    x, h0 = torch.randn(6, 2, 3), torch.randn(directions, 2, 5)  # (T, N, I), (D, N, H)
    reference = _recurrent_node_onnx(kind, direction, 0).SerializeToString()
    y, y_h = ort.InferenceSession(reference, providers=["CPUExecutionProvider"]).run(
        None, {"X": x.numpy(), "H0": h0.numpy()})
    register()
    module = convert(_recurrent_node_onnx(kind, direction, layout))
    if layout == 0:
        got_y, got_h = module(x, h0)
    else:  # (N, T, I), (N, D, H) in; (N, T, D, H), (N, D, H) out
        got_y, got_h = module(x.transpose(0, 1), h0.transpose(0, 1))
        got_y, got_h = got_y.permute(1, 2, 0, 3), got_h.transpose(0, 1)
    assert np.allclose(got_y.detach().numpy(), y, atol=1e-5) and np.allclose(got_h.detach().numpy(), y_h, atol=1e-5)


@pytest.mark.parametrize("kind, change, words", [("GRU", {"linear_before_reset": 0}, "linear_before_reset 0"),
                                                 ("LSTM", {"clip": 3.0}, "clip"),
                                                 ("LSTM", {"sequence_lens": True}, "sequence_lens")])
def test_what_torch_does_not_compute_is_refused_in_one_line(tmp_path, kind, change, words):
    proto = _recurrent_node_onnx(kind, "forward", 0, **change)
    with pytest.raises(GraphpruneError) as exc:
        gp.load(save(proto, tmp_path / "r.onnx"))
    assert f"{kind} with {words} is not converted" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("kind, change", [("LSTM", {"hidden_size": 7}), ("GRU", {"node_direction": "bidirectional"})])
def test_weights_that_do_not_fit_the_node_are_refused_in_one_line(tmp_path, kind, change):
    """torch's kernels take the shapes they are given and read past them: a malformed node is refused."""
    proto = _recurrent_node_onnx(kind, "forward", 0, **change)
    with pytest.raises(GraphpruneError) as exc:
        gp.load(save(proto, tmp_path / "r.onnx"))
    assert f"{kind} weights of shapes" in str(exc.value) and "do not fit" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_an_output_with_its_batch_on_axis_1_is_read_batch_first_and_optimized(tmp_path):
    """(T, N, C), a CTC recogniser's sequence-first output, declared with a dynamic batch: a batch
    of two is two columns, not two rows. It was refused; every reader of the outputs (evaluate, the
    int8 judge, onnxruntime's batches) now moves its batch to axis 0, and optimize writes a file
    onnxruntime runs as the recovered model."""
    from graphprune.data import TinySet
    from graphprune.evaluate import evaluate
    from graphprune.formats.batch_axis import output_batch_axes
    from test_vit import FAST_CONFIG

    model = gp.load(save(crnn_onnx(sequence_first=True), tmp_path / "tnc.onnx"))
    assert model.meta.get("batches_run") is not False and "batch_on_axis_1" not in model.meta
    assert output_batch_axes(model) == (1,) and output_batch_axes(gp.load(save(crnn_onnx(), tmp_path / "n.onnx"))) == (0,)
    images = torch.randn(40, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    tiny = TinySet(images, -torch.ones(40, dtype=torch.long))
    result = evaluate(model, tiny, reference=model)
    assert result["outputs"]["y"]["layout"].startswith("other (N, 16, 5)") and result["images"] == 40
    optimized = gp.optimize(model, tiny, replace(FAST_CONFIG, latency_cut=0.1))
    assert optimized.report["dropped"] == ["block"] and optimized.report["recovery"]["final_loss"] is not None
    path = gp.save(optimized.model, tmp_path / "fast.onnx")
    x = images[:3]
    written, expected = _onnxruntime(path, x), optimized.model.run(x).numpy()
    assert written.shape == (16, 3, 5)  # the file keeps its layout
    assert np.abs(written - expected).max() < 1e-4 * np.abs(expected).max()


def test_a_sequence_of_another_width_is_refused_not_run(tmp_path):
    """torch.lstm runs on inputs of any width without a word (15 px rows gave 60 features where the
    weights take 64): the resolution lever took such a size, and onnxruntime refused the written file."""
    from graphprune.passes.resize_input import CannotRunAt, check_resizable, resize_input, scale_for

    model = gp.load(save(crnn_onnx(), tmp_path / "c.onnx"))
    with pytest.raises(CannotRunAt, match="LSTM takes 64 input features, given 60"):
        check_resizable(model, resize_input(model, scale_for(16, 15), ()))


def test_int8_judges_a_sequence_first_output_batch_first():
    """onnxruntime's batches of a (T, N, C) output are joined along N (batches of 16 and 4 were
    joined along T, and failed), then read as (N, T, C)."""
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import plan_quantization
    from test_quantize import fake_measure

    x = torch.randn(40, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    plan = plan_quantization(crnn_onnx(sequence_first=True), x[:20], x[20:], QuantizeSettings(
        max_calibration_images=20, batch_size=16), fake_measure({"*": 0.3}), output_axes=(1,))
    judged = [c for c in plan.candidates if c.error is None]
    assert judged and all(0 <= c.relative_error < 1 for c in judged)


def test_a_state_fixed_at_batch_1_is_refused_not_run(tmp_path):
    """An export without a dynamic batch holds the LSTM's zero state as a constant of batch 1: torch's
    kernel ran it on a batch of two and corrupted the heap (the process died: 'free(): invalid next
    size'); the check of batches now refuses it and optimize says so in one line."""
    from graphprune.optimize import image_input_shape

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(TinyCrnn("LSTM", sequence_first=True).eval(), (torch.randn(1, 1, 16, 32),), buffer,
                      opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    model = gp.load(save(onnx.load_from_string(buffer.getvalue()), tmp_path / "fixed.onnx"))
    with pytest.raises(GraphpruneError, match="fixes its batch at 1"):
        image_input_shape(model)
    module = next(m for m in model.graph_module.modules() if isinstance(m, OnnxRecurrent))
    with pytest.raises(RuntimeError, match=r"LSTM state of shape \(2, 1, 12\) for a batch of 2"):
        module(torch.randn(16, 2, 64), torch.zeros(2, 1, 12), torch.zeros(2, 1, 12))
