"""Detector heads as ultralytics exports them beyond the plain (N, 4+C, anchors) output: ``nms=True``
(NonZero -> Transpose -> GatherND picks the candidate boxes, NonMaxSuppression ranks them) and the
end-to-end heads of YOLOv10/YOLO26 (TopK over the scores). Hand-written graphs, no ultralytics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.errors import GraphpruneError
from graphprune.detections import DECODERS, DetectionCounts
from graphprune.fidelity import output_layout
from graphprune.formats.io_onnx import same_rows
from graphprune.optimize import image_input_shape
from onnx_builders import save
from yolo_like import tiny_yolo, tiny_yolo_onnx


def _candidates_onnx() -> onnx.ModelProto:
    """X (1, 4, 8, 8) -> Conv -> ReduceMax over channels -> the positions over 0 (NonZero ->
    Transpose, as the exporters write ``torch.nonzero``) -> GatherND of their values -> ReduceSum:
    one number, as an embedded NMS reads the boxes whose score passes the threshold."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0.0], np.float32), "zero")]
    nodes = [helper.make_node("Conv", ["X", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
             helper.make_node("ReduceMax", ["c"], ["m"], axes=[1], keepdims=0, name="/ReduceMax"),
             helper.make_node("Greater", ["m", "zero"], ["keep"], name="/Greater"),
             helper.make_node("NonZero", ["keep"], ["where"], name="/NonZero"),
             helper.make_node("Transpose", ["where"], ["indices"], perm=[1, 0], name="/Transpose"),
             helper.make_node("GatherND", ["m", "indices"], ["picked"], name="/GatherND"),
             helper.make_node("ReduceSum", ["picked"], ["Y"], keepdims=1, name="/ReduceSum")]
    graph = helper.make_graph(nodes, "candidates", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_non_zero_gives_indices_as_onnx_lays_them_out(tmp_path):
    # onnx2torch's NonZero gave torch.nonzero's (count, rank); the GatherND after the Transpose
    # then failed: "The last dimension of indices should have a value between 1 ... got 63 and 3"
    path = save(_candidates_onnx(), tmp_path / "candidates.onnx")
    model = gp.load(path)
    x = torch.randn(1, 4, 8, 8)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"X": x.numpy()})
    assert np.allclose(model.run(x).numpy(), expected, atol=1e-5)


def test_ranked_detections_compare_as_sets_of_rows():
    rng = np.random.default_rng(0)
    boxes = rng.normal(0, 50, (2, 300, 6)).astype(np.float32)
    reordered = boxes[:, rng.permutation(300)]  # equal scores ranked in another order
    assert same_rows(reordered, boxes, 1e-3)
    other = boxes.copy()
    other[1, 7, 0] += 1.0  # one box moved: not the same detections
    assert not same_rows(other, boxes, 1e-3)
    assert not same_rows(boxes[0], boxes[0], 1e-3)  # only (N, K, F) lists


def _grid_sample_onnx(opset: int, mode: str, align_corners: int) -> onnx.ModelProto:
    """X (1, 4, 8, 8) -> Conv -> GridSample at a fixed grid of (6, 5) points, as RT-DETR's
    deformable attention samples its feature maps."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(-1.1, 1.1, (1, 6, 5, 2)).astype(np.float32), "grid")]
    nodes = [helper.make_node("Conv", ["X", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
             helper.make_node("GridSample", ["c", "grid"], ["Y"], mode=mode, align_corners=align_corners,
                              padding_mode="border", name="/sample/GridSample")]
    graph = helper.make_graph(nodes, "grid_sample", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 6, 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset, mode, align_corners", [(16, "bilinear", 0), (18, "nearest", 1), (20, "linear", 1)])
def test_grid_sample_converts(tmp_path, opset, mode, align_corners):
    # was refused: "unsupported ONNX ops in rtdetr-l.onnx: GridSample-17"
    path = save(_grid_sample_onnx(opset, mode, align_corners), tmp_path / "grid.onnx")
    model = gp.load(path)
    x = torch.randn(1, 4, 8, 8)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"X": x.numpy()})
    assert np.allclose(model.run(x).numpy(), expected, atol=1e-5)


def _final_detections(classes: int, centred: bool = False, seed: int = 0) -> torch.Tensor:
    """(2, 300, 6) as an end-to-end head ranks its detections: boxes, score (descending), class;
    the rows after the 40th all 0, as an nms=True export pads them."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(2, 300, 2, generator=g) * 200
    size = torch.rand(2, 300, 2, generator=g) * 100 + 4
    boxes = torch.cat([corner + size / 2, size], -1) if centred else torch.cat([corner, corner + size], -1)
    scores = torch.rand(2, 300, generator=g).sort(1, descending=True).values
    labels = torch.randint(0, classes, (2, 300), generator=g).float()
    out = torch.cat([boxes, scores[..., None], labels[..., None]], -1)
    out[:, 40:] = 0
    return out


@pytest.mark.parametrize("classes", [1, 80])
def test_final_detections_are_read_as_detections(classes):
    # a one-class end-to-end head (class column all 0) was read as YOLOv5 anchors: its class index
    # taken for a class score, so no detection at all
    out = _final_detections(classes)
    assert output_layout(out) == "detections"
    assert [len(d) for d in DECODERS["detections"](out)] == [int((o[:, 4] > 0.25).sum()) for o in out]
    counts = DetectionCounts("detections")
    counts.add(out, out)
    assert counts.kept == counts.original > 0 and counts.as_dict()["map50"] == 1.0
    moved = out.clone()
    moved[:, :, :4] += 1000  # every box elsewhere: nothing kept
    counts = DetectionCounts("detections")
    counts.add(out, moved)
    assert counts.kept == 0 and counts.as_dict()["map50"] == 0.0


def test_centred_final_detections_are_read_as_such():
    out = _final_detections(80, centred=True)
    assert output_layout(out) == "detections_xywh"  # RT-DETR's (1, 300, 6): cx, cy, w, h, score, class
    (first, _) = DECODERS["detections_xywh"](out)
    row = out[0, 0]
    assert torch.allclose(first.boxes[0], torch.cat([row[:2] - row[2:4] / 2, row[:2] + row[2:4] / 2]))


def test_unranked_rows_are_not_final_detections():
    out = _final_detections(80)
    assert output_layout(out.flip(1)) != "detections"  # scores rising: not a ranked list
    fractional = out.clone()
    fractional[:, :, 5] += 0.5  # a sixth value that is no class index
    assert output_layout(fractional) not in ("detections", "detections_xywh")


def _first_image_only_onnx() -> onnx.ModelProto:
    """X (batch, 4, 8, 8) -> Conv -> times (image index == 0): a dynamic batch in which every image
    but the first comes out 0, as ultralytics' nms=True export (dynamic=True) gives its detections."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "zero_scalar"),
             numpy_helper.from_array(np.array(1, np.int64), "one_scalar"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "column")]
    nodes = [helper.make_node("Conv", ["X", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
             helper.make_node("Shape", ["X"], ["shape"], name="/Shape"),
             helper.make_node("Gather", ["shape", "zero_scalar"], ["count"], axis=0, name="/Gather"),
             helper.make_node("Range", ["zero_scalar", "count", "one_scalar"], ["index"], name="/Range"),
             helper.make_node("Equal", ["index", "zero"], ["first"], name="/Equal"),
             helper.make_node("Cast", ["first"], ["mask"], to=TensorProto.FLOAT, name="/Cast"),
             helper.make_node("Reshape", ["mask", "column"], ["mask4"], name="/Reshape"),
             helper.make_node("Mul", ["c", "mask4"], ["Y"], name="/Mul")]
    graph = helper.make_graph(nodes, "first_only", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_a_declared_batch_that_keeps_only_the_first_image_is_refused_by_optimize(tmp_path):
    # scoring and evaluation ran batches of 16 and compared one image's detections per batch
    model = gp.load(save(_first_image_only_onnx(), tmp_path / "first_only.onnx"))
    assert model.meta["batches_run"] is False
    with pytest.raises(GraphpruneError, match="declares a dynamic batch.*nms=True"):
        image_input_shape(model)


def test_a_declared_batch_that_holds_is_kept(tmp_path):
    from onnx_builders import residual_onnx

    model = gp.load(save(residual_onnx(), tmp_path / "residual.onnx"))  # (batch, 4, 8, 8): each image its own
    assert model.meta.get("batches_run") is not False
    image_input_shape(model)


class _WithExtraRows(torch.nn.Module):
    """A YOLOv8 head's (N, 4+3, anchors) output with 5 rows after it outside [0, 1], as a segment
    head's mask coefficients (a pose head's keypoints, an obb head's angle) follow its class scores."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        y = self.detector(x)
        return torch.cat([y, 3.0 * y[:, :5] - 40.0], 1)


class _WithAngles(torch.nn.Module):
    """An obb head's (N, 4+3+1, anchors) output: a YOLOv8 head's rows (boxes made 8 to 16 pixels long
    and a quarter as wide: the tiny head's are near 0, and a box of no area overlaps nothing), then
    each box's angle in [-pi/4, 3pi/4) (ultralytics' range) from the features, as its OBB head
    computes it."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        y = self.detector(x)
        length = 8 + 8 * torch.sigmoid(y[:, 2:3])
        return torch.cat([y[:, :2], length, length / 4, y[:, 4:], (torch.sigmoid(y[:, :1] / 8) - 0.25) * torch.pi], 1)


def _segment_like_onnx(task: str | None, module=_WithExtraRows) -> onnx.ModelProto:
    import io

    buffer = io.BytesIO()
    torch.onnx.export(module(tiny_yolo(score_bias=-1.0)), (torch.randn(1, 3, 64, 64),), buffer,
                      opset_version=17, dynamo=False, input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    if task:
        for key, value in (("author", "Ultralytics"), ("task", task), ("names", "{0: 'a', 1: 'b', 2: 'c'}")):
            proto.metadata_props.add(key=key, value=value)
    return proto


def test_a_segment_pose_or_obb_head_is_scored_by_its_boxes_and_classes_as_its_metadata_says(tmp_path):
    """Without metadata the extra rows make the output 'other' (relative error only); with an
    ultralytics task and its 3 class names the first 4+3 rows are decoded as YOLOv8 detections, in
    evaluation (fx and onnxruntime) and in int8's judge, the rest still in the relative error."""
    from graphprune.data import TinySet
    from graphprune.evaluate import evaluate, evaluate_onnx
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import Timing, plan_quantization

    images = TinySet(torch.rand(24, 3, 64, 64), torch.full((24,), -1))
    plain = gp.load(save(_segment_like_onnx(None), tmp_path / "plain.onnx"))
    assert plain.meta["detection_rows"] is None
    assert evaluate(plain, images, plain)["outputs"]["output0"]["layout"].startswith("other")
    proto = _segment_like_onnx("segment")
    model = gp.load(save(proto, tmp_path / "seg.onnx"))
    assert model.meta["detection_rows"] == {"rows": 7, "task": "segment"}
    for result in (evaluate(model, images, model), evaluate_onnx(proto, images, model), evaluate_onnx(proto, images)):
        output = result["outputs"]["output0"]
        assert output["layout"].startswith("YOLOv8 detections (N, 4+3, ") and "its other 5 rows" in output["layout"]
        assert "detections" in output
    compared = evaluate(model, images, model)["outputs"]["output0"]
    head_only = gp.load(save(tiny_yolo_onnx(score_bias=-1.0), tmp_path / "head.onnx"))  # the same detector alone
    alone = evaluate(head_only, images, head_only)["outputs"]["output0"]
    assert compared["detections"] == alone["detections"] and alone["detections"]["original"] > 0
    assert compared["relative_error"] == 0.0
    settings = QuantizeSettings(max_calibration_images=16, batch_size=8, float_groups=(), mimic="off")
    plan = plan_quantization(proto, images.images[:16], images.images, settings, lambda p: Timing(0.3, 1.0, 0.7))
    assert plan.metric == "map50_drop" and all(c.detections for c in plan.candidates if c.error is None)
    broken = _segment_like_onnx("segment")
    broken.metadata_props[2].value = "{0: 'a', 1: 'b', 2: 'c'" * 3  # not a literal: no rows, no failure
    assert gp.load(save(broken, tmp_path / "broken.onnx")).meta["detection_rows"] is None


def test_an_obb_head_is_decoded_with_its_angles_in_evaluation_and_in_int8s_judge(tmp_path):
    """With the obb task in its metadata the row after the 3 class scores is the boxes' angle: the
    layout says oriented detections, the original keeps all of its own, a model whose angles differ
    loses some (the same boxes upright would all match), and int8's judge reads them so too."""
    from graphprune.data import TinySet
    from graphprune.evaluate import evaluate, evaluate_onnx
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import Timing, plan_quantization

    images = TinySet(torch.rand(24, 3, 64, 64), torch.full((24,), -1))
    proto = _segment_like_onnx("obb", _WithAngles)
    model = gp.load(save(proto, tmp_path / "obb.onnx"))
    assert model.meta["detection_rows"] == {"rows": 7, "task": "obb"}
    for result in (evaluate(model, images, model), evaluate_onnx(proto, images, model)):
        output = result["outputs"]["output0"]
        assert output["layout"].startswith("YOLOv8 oriented detections (N, 4+3+1, ") and "other" not in output["layout"]
        assert output["detections"]["original"] > 0 and output["detections"]["kept_fraction"] == 1.0
    turned = onnx.load_from_string(proto.SerializeToString())  # the same network, its angles a quarter turn on
    last = turned.graph.node[-1]
    turned.graph.node.append(helper.make_node("Split", [last.output[0], "split_rows"], ["head", "angle"], axis=1))
    turned.graph.node.append(helper.make_node("Add", ["angle", "quarter"], ["turned_angle"]))
    turned.graph.node.append(helper.make_node("Concat", ["head", "turned_angle"], ["turned_output"], axis=1))
    turned.graph.initializer.extend([numpy_helper.from_array(np.array([7, 1], np.int64), "split_rows"),
                                     numpy_helper.from_array(np.array(np.pi / 2, np.float32), "quarter")])
    turned.graph.output[0].name = "turned_output"
    oriented = evaluate_onnx(turned, images, model)["outputs"]["turned_output"]["detections"]
    assert oriented["kept"] < oriented["original"]
    upright = TinySet(images.images, images.labels)
    plain = gp.load(save(_segment_like_onnx("segment", _WithAngles), tmp_path / "upright.onnx"))
    assert evaluate_onnx(turned, upright, plain)["outputs"]["turned_output"]["detections"]["kept_fraction"] == 1.0
    settings = QuantizeSettings(max_calibration_images=16, batch_size=8, float_groups=(), mimic="off")
    plan = plan_quantization(proto, images.images[:16], images.images, settings, lambda p: Timing(0.3, 1.0, 0.7))
    assert plan.metric == "map50_drop" and all(c.detections for c in plan.candidates if c.error is None)
