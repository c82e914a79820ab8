"""benchmarks/yolox_model.py: the decoding appended to an undecoded YOLOX is YOLOX's own."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.yolox_model import SIZE, STRIDES, decoded


def test_decoded_boxes_are_yoloxs_decoding():
    anchors = sum((SIZE // s) ** 2 for s in STRIDES)
    graph = helper.make_graph([helper.make_node("Identity", ["raw_in"], ["output"])], "raw",
                              [helper.make_tensor_value_info("raw_in", TensorProto.FLOAT, [1, anchors, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, anchors, 6])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    raw = np.random.default_rng(0).normal(0, 1, (1, anchors, 6)).astype(np.float32)
    (out,) = ort.InferenceSession(decoded(proto).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"raw_in": raw})
    # anchor 0: the first cell of stride 8; the last anchor: the last cell (12, 12) of stride 32
    assert np.allclose(out[0, 0, :2], raw[0, 0, :2] * 8) and np.allclose(out[0, 0, 2:4], np.exp(raw[0, 0, 2:4]) * 8)
    assert np.allclose(out[0, -1, :2], (raw[0, -1, :2] + 12) * 32, atol=1e-4)
    assert np.allclose(out[0, 52, :2], (raw[0, 52, :2] + [0, 1]) * 8)  # x fastest: anchor 52 is (0, 1)
    assert np.array_equal(out[..., 4:], raw[..., 4:])
    assert onnx.load_from_string(decoded(proto).SerializeToString()).graph.output[0].name == "detections"
