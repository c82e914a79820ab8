"""Fidelity on --eval-data: IoU, NMS and matching on hand-made boxes, a YOLOv8-style detector end to
end (fx graph and written ONNX file), a two-output model, a labels.csv folder, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import graphprune as gp
from graphprune.data import Preprocessing, TinySet, load_tiny_set
from graphprune.errors import GraphpruneError
from graphprune.evaluate import evaluate, evaluate_onnx
from graphprune.ctc import CtcText, ctc_text, edit_distance, same_text
from graphprune.detections import (CONFIDENCE, DetectionCounts, Detections, average_precision, box_iou, decode_yolov5,
                                   decode_yolov8, matched, ranked_hits)
from graphprune.fidelity import MapOverlap, class_kl, output_layout, same_top_classes
from graphprune.report import format_summary
from onnx_builders import save
from yolo_like import tiny_yolo5_onnx, tiny_yolo_onnx


def _detections(boxes, classes, scores=None):
    boxes = torch.tensor(boxes, dtype=torch.float)
    scores = torch.ones(len(boxes)) if scores is None else torch.tensor(scores)
    return Detections(boxes, scores, torch.tensor(classes))


def test_box_iou_on_hand_made_boxes():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 5, 7]])  # the last has zero area
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2]])
    expected = torch.tensor([[1 / 7, 1.0], [0.0, 1 / 4], [0.0, 0.0]])  # 1 / (4 + 4 - 1); a corner touch is 0
    assert torch.allclose(box_iou(a, b), expected)
    assert box_iou(a[2:], a[2:]).item() == 0.0  # zero area overlaps nothing, itself included


def _yolo_output(anchors):
    """(1, 4 + 2, A) from rows (cx, cy, w, h, score of class 0, score of class 1), A > 6."""
    rows = anchors + [(0, 0, 1, 1, 0.0, 0.1)] * (8 - len(anchors))
    return torch.tensor(rows, dtype=torch.float).T[None]


def test_decoding_keeps_confident_boxes_after_per_class_nms():
    output = _yolo_output([
        (10, 10, 4, 4, 0.9, 0.1),    # kept
        (10.5, 10, 4, 4, 0.8, 0.1),  # IoU 14/18 with the first, same class: suppressed
        (10.5, 10, 4, 4, 0.1, 0.7),  # the same box for class 1: kept
        (12, 10, 4, 4, 0.6, 0.0),    # IoU 8/24 with the first: kept
        (30, 30, 4, 4, CONFIDENCE, 0.0),  # at the threshold: not confident
        (30, 30, 2, 2, 0.26, 0.0),   # kept
    ])
    assert output_layout(output) == "yolov8"
    (found,) = decode_yolov8(output)
    assert found.scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.26])
    assert found.classes.tolist() == [0, 1, 0, 0]
    assert found.boxes[0].tolist() == [8, 8, 12, 12] and found.boxes[3].tolist() == [29, 29, 31, 31]


def test_yolov5_decoding_scores_each_class_by_objectness_times_its_score():
    rows = [(10, 10, 4, 4, 0.9, 0.9, 0.1),     # 0.81 for class 0: kept
            (10.5, 10, 4, 4, 0.5, 0.6, 0.1),   # 0.30 for class 0, IoU 14/18 with the first: suppressed
            (30, 30, 4, 4, 0.5, 0.4, 0.45),    # 0.225 at best: not confident, though each score is above 0.25
            (50, 50, 2, 2, 0.3, 0.1, 0.95)]    # 0.285 for class 1: kept
    output = torch.tensor(rows + [(0, 0, 1, 1, 0.0, 0.0, 0.0)] * 4, dtype=torch.float)[None]  # 8 anchors > 7
    assert output_layout(output) == "yolov5"
    (found,) = decode_yolov5(output)
    assert found.scores.tolist() == pytest.approx([0.81, 0.285]) and found.classes.tolist() == [0, 1]
    assert found.boxes.tolist() == [[8, 8, 12, 12], [49, 49, 51, 51]]
    counts = DetectionCounts("yolov5")
    counts.add(output, output)
    assert counts.as_dict()["kept"] == 2 and counts.as_dict()["map50"] == 1.0


def test_a_yolov5_style_detector_is_compared_by_its_detections(tmp_path):
    path = save(tiny_yolo5_onnx(), tmp_path / "yolo5.onnx")
    model = gp.load(path)
    assert [b.name for b in gp.find_blocks(model)] == ["stage1.1.m.0", "stage1.1.m.1", "stage2.1.m.0"]
    smaller = gp.drop_blocks(model, ["stage1.1.m.1"], gp.find_blocks(model))
    data = _unlabelled()
    result = evaluate(smaller, data, model)["outputs"]["output0"]
    assert result["layout"].startswith("YOLOv5-style detections (N, 960 anchors, 5+3): cx, cy, w, h, objectness")
    found = result["detections"]
    assert found["original"] > len(data) and 0 < found["kept"] < found["original"]
    assert 0 < found["map50"] < 1
    itself = evaluate(model, data, model)["detections"]
    assert itself["kept_fraction"] == 1.0 and itself["map50"] == itself["map50_reverse"] == 1.0


def test_layouts_from_the_output_shape():
    assert output_layout(torch.zeros(2, 10)) == "classes"
    assert output_layout(torch.zeros(2, 1)) == "other"
    assert output_layout(torch.zeros(2, 84, 8400)) == "yolov8"
    mask_coefficients = torch.zeros(2, 116, 8400)
    mask_coefficients[:, 90] = -3  # a segmentation head's rows after the classes are not scores
    assert output_layout(mask_coefficients) == "other"
    # anchors first: YOLOv5's export (cx, cy, w, h, objectness, classes), as a transposed YOLOv8's reads too
    assert output_layout(torch.zeros(2, 8400, 84)) == "yolov5" == output_layout(torch.rand(2, 25200, 85))
    assert output_layout(torch.full((2, 8400, 85), 2.0)) == "other"  # objectness and scores lie in [0, 1]
    assert output_layout(torch.rand(2, 8400, 5)) == "other"  # no class score
    undecoded = torch.rand(2, 3549, 6)
    undecoded[:, 7, 2] = -0.1  # a log size: YOLOX exported without its decoding holds no boxes to match
    assert output_layout(undecoded) == "other"
    scores = torch.rand(2, 7600, 10) * 0.03  # class scores of a head exported undecoded (PicoDet's), no boxes:
    assert output_layout(scores) == output_layout(scores.transpose(1, 2)) == "other"  # low everywhere
    scores[:, 5, :2] = 0.9  # or near 0 for all anchors but a confident few
    assert output_layout(scores) == output_layout(scores.transpose(1, 2)) == "other"
    fractions = torch.rand(2, 300, 84)  # boxes in fractions of the image tile it
    fractions[..., 4:] *= 0.03
    assert output_layout(fractions) == "yolov5" and output_layout(fractions.transpose(1, 2)) == "yolov8"
    assert output_layout(torch.full((2, 3, 8, 8), -0.5)) == "other"
    assert output_layout(torch.rand(2, 1, 8, 8)) == "map"  # a sigmoid's text or segmentation map
    assert output_layout(torch.rand(2, 1, 8, 1)) == "other"
    # a CTC recogniser's characters per position (PP-OCRv4's: (N, 40, 6625)), whose probabilities also
    # lie in [0, 1] as a YOLOv8 head's class scores do, but sum to 1 at each position
    assert output_layout(torch.randn(2, 40, 97).softmax(-1)) == "sequence"
    assert output_layout(torch.rand(2, 84, 8400)) == "yolov8"


def test_map_iou_is_the_regions_iou_with_the_thresholds_integrated_out():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 16, 16, generator=generator), torch.rand(3, 1, 16, 16, generator=generator) ** 2
    overlap = MapOverlap()
    overlap.add(a[:2], b[:2])
    overlap.add(a[2:], b[2:])  # summed over batches
    thresholds = torch.linspace(0, 1, 20001)[:-1, None]  # a Riemann sum of the regions over t in [0, 1)
    inside_a, inside_b = a.flatten() > thresholds, b.flatten() > thresholds
    integrated = float((inside_a & inside_b).sum()) / float((inside_a | inside_b).sum())
    assert overlap.value() == pytest.approx(integrated, abs=1e-3)
    masks = MapOverlap()  # binary maps: the plain IoU of their regions
    masks.add((a > 0.5).float(), (b > 0.5).float())
    assert masks.value() == pytest.approx(float(((a > 0.5) & (b > 0.5)).sum() / ((a > 0.5) | (b > 0.5)).sum()))
    same, empty = MapOverlap(), MapOverlap()
    same.add(a, a)
    empty.add(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert same.value() == 1.0 and empty.value() is None


def test_class_kl_reads_scores_or_probabilities():
    """KL(p_reference || p_output): zero for the same scores, the same whether the scores are logits
    or already probabilities, and the textbook value for two hand-made distributions."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    other = torch.tensor([[0.0, 2.0, -1.0], [0.5, 0.5, 3.0]])
    assert class_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert class_kl(other, logits) == pytest.approx(class_kl(other.softmax(1), logits.softmax(1)), rel=1e-5)
    p, q = logits.softmax(1)[0], other.softmax(1)[0]
    assert class_kl(other, logits) == pytest.approx(float((p * (p / q).log()).sum()) / 2, rel=1e-5)  # 2nd row: 0


def test_matching_is_greedy_one_to_one_within_a_class():
    original = _detections([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0, 0, 1])
    optimized = _detections([[1, 0, 11, 10],    # IoU 90/110 with the first
                             [0, 0, 10, 10],    # IoU 1 with the first: taken before the one above
                             [25, 0, 35, 10],   # IoU 50/150 with the second: too little
                             [40, 0, 50, 10]],  # the third's box, another class
                            [0, 0, 0, 0])
    assert matched(original, optimized) == 1
    assert matched(original, original) == 3
    shifted = _detections([[0, 0, 10, 10], [21, 0, 31, 10], [40, 0, 50, 10]], [0, 0, 1])
    assert matched(original, shifted) == 3  # 90/110 >= 0.5


def test_detection_counts_sum_over_images():
    counts = DetectionCounts()
    original = _yolo_output([(10, 10, 4, 4, 0.9, 0.0), (30, 30, 4, 4, 0.0, 0.8)])
    optimized = _yolo_output([(10.2, 10, 4, 4, 0.7, 0.0), (30, 30, 4, 4, 0.8, 0.0), (50, 50, 4, 4, 0.5, 0.0)])
    counts.add(torch.cat([original, original]), torch.cat([optimized, original]))
    # map50, the original's 4 as the truth, 2 a class (one per image). Class 0 ranked: 0.9 (hit, image 2),
    # 0.8 (image 1's class-1 box read as class 0: false), 0.7 (hit), 0.5 (false): precision 1, 1/2, 2/3,
    # 2/4 at recall 1/2, 1/2, 1, 1, AP = 1/2 * 1 + 1/2 * 2/3. Class 1: 0.8 (hit, image 2), then the
    # padding anchors' 0.1 box in each image (false; below CONFIDENCE, above AP_CONFIDENCE): AP 1/2
    assert counts.as_dict() == pytest.approx({"original": 4, "optimized": 5, "kept": 3, "kept_fraction": 0.75,
                                              "added": 2, "added_fraction": 0.4, "map50": (5 / 6 + 1 / 2) / 2,
                                              "map50_reverse": 0.5})
    # map50_reverse, the optimised model's 5 as the truth (class 0: 3 in image 1, 1 in image 2; class
    # 1: 1 in image 2), the original's ranked: class 0 finds 2 of 4 (0.9, 0.9): AP 1/2; class 1
    # ranks image 1's 0.8 (false: image 1 has no class-1 truth) before image 2's (a tie, kept in
    # image order), then the 0.1 boxes: precision 1/2 at recall 1, AP 1/2
    assert DetectionCounts().as_dict()["kept_fraction"] is None and DetectionCounts().as_dict()["map50"] is None
    itself = DetectionCounts()
    itself.add(original, original)
    assert itself.as_dict()["map50"] == itself.as_dict()["map50_reverse"] == 1.0


def test_ranked_hits_pair_each_truth_once_highest_score_first():
    truth = _detections([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 1])
    predicted = _detections([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [50, 50, 60, 60]], [0, 0, 1, 1],
                            [0.3, 0.95, 0.5, 0.6])
    # the 0.95 box takes the class-0 truth (IoU 90/110) before the exact 0.3 box; the 0.6 box overlaps nothing
    assert ranked_hits(truth, predicted).tolist() == [False, True, True, False]
    assert ranked_hits(_detections(torch.zeros(0, 4), []), predicted).tolist() == [False] * 4
    in_class_1 = predicted.classes == 1  # a false positive at 0.6 ranked above the hit at 0.5
    hits = ranked_hits(truth, predicted)
    assert average_precision(predicted.scores[in_class_1], hits[in_class_1], 1) == pytest.approx(0.5)
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 1) == 0.0  # nothing found


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """The DFL detector: its box rows are positive, as a real head's cx, cy, w, h are."""
    folder = tmp_path_factory.mktemp("yolo")
    path = save(tiny_yolo_onnx(reg=16), folder / "yolo.onnx")
    model = gp.load(path)
    smaller = gp.drop_blocks(model, ["stage1.1.m.1"], gp.find_blocks(model))
    gp.save(smaller, folder / "smaller.onnx")
    return path, model, smaller, folder / "smaller.onnx"


def _unlabelled(n=12, size=64, seed=0):
    return TinySet(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)),
                   -torch.ones(n, dtype=torch.long))


def test_a_detector_end_to_end_on_the_fx_model_and_the_written_file(yolo):
    _, model, smaller, smaller_path = yolo
    data = _unlabelled()
    alone = evaluate(model, data)
    (name,) = alone["outputs"]
    assert alone["outputs"][name]["layout"].startswith("YOLOv8 detections (N, 4+3, 320 anchors)")
    assert alone["detections"]["count"] > len(data)  # confident detections to compare
    itself = evaluate(model, data, model)["outputs"][name]
    assert itself["relative_error"] == 0 and itself["detections"]["kept_fraction"] == 1.0
    assert itself["detections"]["map50"] == 1.0
    assert itself["detections"]["added"] == 0
    fx = evaluate(smaller, data, model)
    found = fx["detections"]
    assert found["original"] == alone["detections"]["count"] and 0 < found["kept"] < found["original"]
    assert found["added"] == found["optimized"] - found["kept"] and fx["outputs"][name]["relative_error"] > 0
    written = evaluate_onnx(onnx.load(str(smaller_path)), data, model)
    assert written["outputs"][name]["relative_error"] == pytest.approx(fx["outputs"][name]["relative_error"], rel=1e-3)
    assert abs(written["detections"]["kept"] - found["kept"]) <= 2  # a score at the threshold may differ by 1e-6


def test_class_labels_cannot_be_scored_against_a_detector(yolo):
    _, model, smaller, _ = yolo
    data = _unlabelled()
    data.labels[:] = 1
    with pytest.raises(GraphpruneError, match=r"labels cannot be scored against a detector; give the images "
                                              r"without labels") as exc:
        evaluate(smaller, data, model)
    assert "'output0' (N, 7, 320)" in str(exc.value)


class TwoOutputs(nn.Module):
    """Class scores and the feature map they are pooled from."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return self.fc(features.mean((2, 3))), features


def test_every_output_of_a_two_output_model(tmp_path):
    torch.manual_seed(0)
    module = TwoOutputs().eval()
    path = tmp_path / "two.onnx"
    torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["logits", "features"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    original = gp.load(path)
    changed = original.clone()
    with torch.no_grad():
        for p in changed.graph_module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    data = _unlabelled(20, 8)
    data.labels[:] = original.run(data.images).argmax(1)  # the original's own classes: its top-1 is 1
    assert evaluate(original, data)["top1"] == 1.0
    fx = evaluate(changed, data, original)
    assert list(fx["outputs"]) == ["logits", "features"]
    assert fx["outputs"]["features"]["layout"] == "other (N, 8, 8, 8): relative error only"
    logits = fx["outputs"]["logits"]
    assert fx["top1"] == logits["top1"] == logits["agreement"] == fx["agreement"]
    assert all(0 < out["relative_error"] < 1 for out in fx["outputs"].values())
    expected = torch.linalg.norm(changed.graph_module(data.images)[1] - original.graph_module(data.images)[1]) \
        / torch.linalg.norm(original.graph_module(data.images)[1])
    assert fx["outputs"]["features"]["relative_error"] == pytest.approx(float(expected), rel=1e-4)
    changed_path = tmp_path / "changed.onnx"
    gp.save(changed, changed_path)
    written = evaluate_onnx(onnx.load(str(changed_path)), data, original, batch_size=7)
    for name in ("logits", "features"):
        assert written["outputs"][name]["relative_error"] == pytest.approx(fx["outputs"][name]["relative_error"],
                                                                          rel=1e-3)
    assert written["agreement"] == fx["agreement"]



class TextMap(nn.Module):
    """A text detector's shape: image -> conv -> relu -> conv -> sigmoid, a (N, 1, H, W) map."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return torch.sigmoid(4 * self.body(x))


def _exported_and_nudged(module: nn.Module, path, size: tuple[int, int], output: str, nudge: float):
    """``module`` exported to ONNX and loaded, and a copy whose weights moved by ``nudge`` x N(0, 1)."""
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), (torch.randn(1, 3, *size),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=[output], dynamic_axes={"x": {0: "batch"}, output: {0: "batch"}})
    original = gp.load(path)
    changed = original.clone()
    with torch.no_grad():
        for p in changed.graph_module.parameters():
            p.add_(nudge * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return original, changed


def test_a_maps_fidelity_is_the_iou_of_the_regions_it_marks(tmp_path):
    torch.manual_seed(0)
    original, changed = _exported_and_nudged(TextMap(), tmp_path / "map.onnx", (16, 16), "text", 0.05)
    data = _unlabelled(20, 16)
    assert evaluate(original, data, original)["map_iou"] == 1.0
    fx = evaluate(changed, data, original)
    a, b = original.graph_module(data.images), changed.graph_module(data.images)
    expected = float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum())
    assert fx["map_iou"] == fx["outputs"]["text"]["map_iou"] == pytest.approx(expected, rel=1e-5)
    assert 0.6 < expected < 0.99 and "IoU of the regions" in fx["outputs"]["text"]["layout"]
    changed_path = tmp_path / "changed.onnx"
    gp.save(changed, changed_path)
    written = evaluate_onnx(onnx.load(str(changed_path)), data, original, batch_size=7)
    assert written["map_iou"] == pytest.approx(expected, rel=1e-4)
    report = {"latency": {"original_ms": 2.0, "optimized_ms": 1.5, "cut": 0.25, "target": 0.2}, "blocks": [],
              "dropped": [], "seconds_per_stage": {}, "eval": {"original": evaluate(original, data), "optimized": fx}}
    lines = format_summary(report)
    assert f"text: IoU of the regions it marks with the original's {expected:.3f}" in lines



class Recogniser(nn.Module):
    """A CTC recogniser's shape: image -> conv -> pooled to a row of T positions -> K classes each, softmax."""

    def __init__(self, classes: int = 12):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        row = torch.relu(self.conv(x)).mean(2)  # (N, 16, T = W)
        return self.head(row.transpose(1, 2)).softmax(-1)  # (N, T, K)


def test_a_recognisers_fidelity_is_the_same_top_class_at_every_position(tmp_path):
    torch.manual_seed(0)
    original, changed = _exported_and_nudged(Recogniser(), tmp_path / "rec.onnx", (8, 10), "chars", 0.03)
    data = TinySet(torch.randn(40, 3, 8, 10, generator=torch.Generator().manual_seed(0)), -torch.ones(40, dtype=torch.long))
    fx = evaluate(changed, data, original)
    a, b = original.graph_module(data.images).argmax(-1), changed.graph_module(data.images).argmax(-1)
    images, positions = float((a == b).all(1).float().mean()), float((a == b).float().mean())
    assert 0 < images < positions < 1  # some images differ at some position, most positions agree
    chars = fx["outputs"]["chars"]
    assert fx["agreement"] == chars["agreement"] == pytest.approx(images)
    assert chars["positions_agreement"] == pytest.approx(positions) and "detections" not in chars
    assert bool(same_top_classes(torch.eye(3)[None], torch.eye(3)[None])) and \
        not bool(same_top_classes(torch.eye(3)[None], torch.eye(3)[[[0, 2, 1]]]))
    report = {"latency": {"original_ms": 2.0, "optimized_ms": 1.5, "cut": 0.25, "target": 0.2}, "blocks": [],
              "dropped": [], "seconds_per_stage": {}, "eval": {"original": evaluate(original, data), "optimized": fx}}
    lines = format_summary(report)
    assert f"chars: the original's top class at every position on {100 * images:.2f}% of 40 images" in lines
    assert "top-1 agreement" not in lines
    blank = int(torch.bincount(a.flatten()).argmax())
    texts = [(ctc_text(x, blank), ctc_text(y, blank)) for x, y in zip(a.tolist(), b.tolist())]
    assert chars["ctc"]["blank"] == blank
    assert chars["ctc"]["text_agreement"] == pytest.approx(sum(x == y for x, y in texts) / 40)
    assert chars["ctc"]["text_agreement"] >= images  # the same tops everywhere read the same text
    assert f"chars: the original's top class at every position" in lines and "read as CTC text (blank = class" in lines


def test_ctc_text_collapses_runs_and_drops_the_blank_and_edit_distance_counts_edits():
    assert ctc_text([0, 3, 3, 0, 3, 5, 5, 0], blank=0) == [3, 3, 5]
    assert ctc_text([7, 7, 1, 7], blank=7) == [1]
    assert edit_distance(list("kitten"), list("sitting")) == 3 and edit_distance([], [1, 2]) == 2
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0


def test_ctc_reading_takes_the_original_s_commonest_class_as_blank_and_scores_texts():
    """Two lines: the first reads "12" against "112" (one edit), the second "3" both ways though
    its positions differ; the blank, class 0, is the top class at 6 of 10 positions."""
    def one_hot(rows):
        return torch.eye(6)[torch.tensor(rows)]

    text = CtcText()
    text.add(one_hot([[0, 1, 1, 0, 2], [0, 3, 0, 0, 0]]), one_hot([[1, 0, 0, 1, 2], [3, 3, 0, 0, 0]]))
    result = text.as_dict()
    assert result["blank"] == 0 and result["blank_share"] == pytest.approx(0.6)
    assert result["text_agreement"] == pytest.approx(0.5) and result["character_error_rate"] == pytest.approx(1 / 3)
    assert not bool(same_top_classes(one_hot([[0, 3, 0, 0, 0]]), one_hot([[3, 3, 0, 0, 0]])))
    assert same_text(one_hot([[1, 0, 0, 1, 2], [3, 3, 0, 0, 0]]),
                     one_hot([[0, 1, 1, 0, 2], [0, 3, 0, 0, 0]])).tolist() == [False, True]
    assert same_text(one_hot([[1, 2, 3, 4, 5]]), one_hot([[1, 2, 3, 4, 0]])) is None  # no class fills half: no blank
    silent = CtcText()
    silent.add(one_hot([[0, 0]]), one_hot([[0, 4]]))
    assert silent.as_dict()["character_error_rate"] is None and silent.as_dict()["text_agreement"] == 0


def test_a_recogniser_that_no_longer_reads_the_text_is_poor_fidelity():
    from graphprune.passes.check_fidelity import poor_fidelity

    ctc = {"blank": 0, "blank_share": 0.6, "text_agreement": 0.4, "character_error_rate": 0.3}
    assert "reads the original's text (CTC) on 40%" in poor_fidelity(
        {"outputs": {"chars": {"agreement": 0.9, "ctc": ctc}}})
    assert poor_fidelity({"outputs": {"chars": {"agreement": 0.2, "ctc": {**ctc, "text_agreement": 0.9}}}}) is None


class Brightness(nn.Module):
    """Five classes: the image's mean value nearest to 0, 0.2, ..., 0.8."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centres", torch.arange(5) / 5)

    def forward(self, x):
        return -(x.mean((1, 2, 3))[:, None] - self.centres) ** 2


def test_top1_on_a_flat_folder_with_labels_csv(tmp_path):
    model = gp.load(Brightness(), input_shape=(1, 3, 8, 8))
    rows = []
    for i in range(6):  # grey 0, 40, ..., 200: classes 0, 1, 2, 2, 3, 4; every other label wrong
        Image.fromarray(np.full((12, 10, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"img_{i}.png")
        right = int(np.abs(40 * i / 255 - np.arange(5) / 5).argmin())
        rows.append(f"img_{i}.png,n0{i},{right if i % 2 else (right + 1) % 5}\n")
    (tmp_path / "labels.csv").write_text("file,wnid,imagenet_class_index\n" + "".join(rows))
    labelled = load_tiny_set(tmp_path, Preprocessing((3, 8, 8), (0.0,), (1.0,)))
    assert labelled.has_labels and len(set(model.run(labelled.images).argmax(1).tolist())) == 5
    assert evaluate(model, labelled)["top1"] == pytest.approx(0.5)


def test_the_summary_says_how_faithful_the_optimised_model_is(yolo):
    _, model, smaller, _ = yolo
    data = _unlabelled()
    report = {"latency": {"original_ms": 2.0, "optimized_ms": 1.5, "cut": 0.25, "target": 0.2}, "blocks": [],
              "dropped": [], "seconds_per_stage": {}, "eval": {"original": evaluate(model, data),
                                                               "optimized": evaluate(smaller, data, model)}}
    found = report["eval"]["optimized"]["detections"]
    lines = format_summary(report).splitlines()
    assert "output0 decoded as YOLOv8 detections (N, 4+3, 320 anchors): cx, cy, w, h, 3 class scores; " \
           "confidence > 0.25, per-class NMS at IoU 0.45, at most 300, matched at IoU >= 0.5" in lines
    assert f"  kept {found['kept']} of the original's {found['original']} detections " \
           f"({100 * found['kept_fraction']:.1f}%), added {found['added']} ({100 * found['added_fraction']:.1f}% " \
           f"of its {found['optimized']}) on 12 images; mAP50 {found['map50']:.3f} against the original's, " \
           f"{found['map50_reverse']:.3f} the other way" in lines
    assert 0 < found["map50"] < 1
    assert any(line.startswith("relative output error ||y - y_orig|| / ||y_orig||: output0 0.") for line in lines)


@pytest.mark.slow  # 21 s on the shared 2-core machine: the whole pipeline, then three evaluations
def test_optimize_reports_a_detectors_fidelity(cli, yolo, tmp_path):
    path, *_ = yolo
    images = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", images=images)
    out, report = tmp_path / "fast.onnx", tmp_path / "r.json"
    code, stdout, err = cli("optimize", path, "--latency-cut", "0.02", "--quantize", "none", "--margin", "0",
                            "--data", tmp_path / "tiny.npz",
                            "--eval-data", tmp_path / "tiny.npz", "--estimator", "lstsq", "--refine-evaluations", "0",
                            "--recovery-iterations", "3", "--recovery-batch-size", "8", "--min-time", "0.01",
                            "--no-cache", "--quiet", "-o", out, "--report", report)
    assert code == 0, err
    evaluation = json.loads(report.read_text())["eval"]
    assert evaluation["original"]["outputs"]["output0"]["layout"].startswith("YOLOv8 detections")
    found = evaluation["optimized"]["outputs"]["output0"]
    assert found["detections"]["original"] == evaluation["original"]["detections"]["count"]
    assert found["relative_error"] > 0 and "top1" not in evaluation["original"]
    assert "output0 decoded as YOLOv8 detections" in stdout and "of the original's" in stdout
    assert "relative output error ||y - y_orig|| / ||y_orig||: output0" in stdout
