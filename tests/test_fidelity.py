"""Fidelity's detection maths: IoU, NMS and matching on hand-made boxes, and layouts from shapes."""

from __future__ import annotations

import pytest
import torch

from graphprune.fidelity import (CONFIDENCE, DetectionCounts, Detections, box_iou, decode_yolov8, matched,
                                 output_layout)


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


def test_layouts_from_the_output_shape():
    assert output_layout(torch.zeros(2, 10)) == "classes"
    assert output_layout(torch.zeros(2, 1)) == "other"
    assert output_layout(torch.zeros(2, 84, 8400)) == "yolov8"
    mask_coefficients = torch.zeros(2, 116, 8400)
    mask_coefficients[:, 90] = -3  # a segmentation head's rows after the classes are not scores
    assert output_layout(mask_coefficients) == "other"
    assert output_layout(torch.zeros(2, 8400, 84)) == "other"  # anchors first: not YOLOv8's export
    assert output_layout(torch.zeros(2, 3, 8, 8)) == "other"


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
    assert counts.as_dict() == {"original": 4, "optimized": 5, "kept": 3, "kept_fraction": 0.75,
                                "added": 2, "added_fraction": 0.4}
    assert DetectionCounts().as_dict()["kept_fraction"] is None
