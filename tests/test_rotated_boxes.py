"""Oriented boxes (``graphprune.rotated_boxes``): probiou on hand-made boxes against its closed form,
rotated NMS, and an ultralytics obb head's detections matched by their angle."""

from __future__ import annotations

import math

import torch

from graphprune.detections import DetectionCounts, decode_yolov8_obb
from graphprune.fidelity import HeadRows, detection_head, output_layout
from graphprune.rotated_boxes import probiou, rotated_nms


def _probiou_of_offset(offset_in_widths: float) -> float:
    """Two equal upright squares side w, centres ``offset_in_widths`` w apart along x: Sigma = w^2/12 I,
    so B = (o w)^2 / (8 w^2 / 12) = 1.5 o^2 and probiou = 1 - sqrt(1 - exp(-B))."""
    return 1 - math.sqrt(1 - math.exp(-1.5 * offset_in_widths ** 2))


def test_probiou_on_hand_made_boxes():
    box = torch.tensor([[10.0, 10.0, 4.0, 2.0, 0.3]])
    assert probiou(box, box).item() == 1.0
    turned_half = box.clone()
    turned_half[0, 4] += math.pi  # a box turned by 180 degrees is itself
    assert abs(probiou(box, turned_half).item() - 1.0) < 1e-6  # sqrt(B) of a float32 angle's rounding
    square = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    assert abs(probiou(square, torch.tensor([[0.0, 0.0, 2.0, 2.0, math.pi / 2]])).item() - 1.0) < 1e-6
    for offset in (0.25, 0.5, 1.0):
        moved = torch.tensor([[2.0 * offset, 0.0, 2.0, 2.0, 0.0]])
        assert abs(probiou(square, moved).item() - _probiou_of_offset(offset)) < 1e-9
    long = torch.tensor([[50.0, 50.0, 40.0, 10.0, 0.0]])
    across = torch.tensor([[50.0, 50.0, 40.0, 10.0, math.pi / 2]])
    # Sigma_1 = diag(400/3, 25/3), Sigma_2 its transpose: B = ln(det mean / sqrt(det1 det2)) / 2
    expected_b = math.log(((400 / 3 + 25 / 3) / 2) ** 2 / (400 / 3 * 25 / 3)) / 2
    assert abs(probiou(long, across).item() - (1 - math.sqrt(1 - math.exp(-expected_b)))) < 1e-9


def test_probiou_is_symmetric_and_zero_for_far_or_empty_boxes():
    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(6, 2) * 20, torch.rand(6, 2) * 8 + 1, torch.rand(6, 1) * 3], 1)
    matrix = probiou(boxes, boxes)
    assert torch.allclose(matrix, matrix.T) and torch.allclose(matrix.diagonal(), torch.ones(6, dtype=torch.float64))
    assert bool(((matrix >= 0) & (matrix <= 1)).all())
    flat = torch.tensor([[1.0, 1.0, 0.0, 3.0, 0.2]])
    assert probiou(flat, flat).item() == 0.0 and probiou(flat, boxes).abs().sum().item() == 0.0
    assert probiou(boxes[:1], boxes[:1] + torch.tensor([[1e4, 0, 0, 0, 0]])).item() < 1e-12


def test_rotated_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = torch.tensor([[10.0, 10, 12, 3, 0], [10.5, 10, 12, 3, 0.05], [10.0, 10, 12, 3, math.pi / 2],
                          [10.0, 10, 12, 3, 0], [40.0, 40, 12, 3, 0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.5])
    classes = torch.tensor([0, 0, 0, 1, 0])
    # 1 overlaps 0 (probiou 0.92) and goes; 2 crosses 0 (probiou 0.27 < 0.45) and stays; 3 is another class
    assert rotated_nms(boxes, scores, classes, 0.45, 300).tolist() == [3, 0, 2, 4]
    assert rotated_nms(boxes, scores, classes, 0.45, 2).tolist() == [3, 0]
    assert rotated_nms(boxes[:0], scores[:0], classes[:0], 0.45, 300).tolist() == []


def _obb_output(angles: list[float]) -> torch.Tensor:
    """(1, 4 + 2 + 1, 8): two confident long boxes of class 0 and 1 at the first two anchors with
    ``angles``, the other anchors under the confidence."""
    output = torch.zeros(1, 7, 8)
    output[0, :4, 0] = torch.tensor([50.0, 50.0, 40.0, 10.0])
    output[0, :4, 1] = torch.tensor([150.0, 150.0, 40.0, 10.0])
    output[0, :4, 2:] = torch.tensor([300.0, 300.0, 10.0, 10.0])[:, None]
    output[0, 4, 0], output[0, 5, 1] = 0.9, 0.8
    output[0, 6, :2] = torch.tensor(angles)
    return output


def test_an_obb_head_is_matched_by_its_angles_where_upright_boxes_would_all_match():
    head = HeadRows(6, rotated=True)
    original, turned = _obb_output([0.0, 0.0]), _obb_output([math.pi / 2, 0.0])
    assert output_layout(original, head) == "yolov8_obb" and output_layout(original, HeadRows(6)) == "yolov8"
    assert detection_head(original, head).shape == (1, 7, 8) and detection_head(original, HeadRows(6)).shape == (1, 6, 8)
    (decoded,) = decode_yolov8_obb(original)
    assert len(decoded) == 2 and decoded.angles.tolist() == [0.0, 0.0] and decoded.classes.tolist() == [0, 1]
    oriented = DetectionCounts("yolov8_obb")
    oriented.add(original, turned)  # the first box crosses its original: probiou 0.27
    upright = DetectionCounts("yolov8")
    upright.add(original[:, :6], turned[:, :6])
    assert (oriented.kept, oriented.original) == (1, 2) and upright.kept == 2
    assert oriented.as_dict()["map50"] == 0.5  # class 0 lost, class 1 kept
    same = DetectionCounts("yolov8_obb")
    same.add(original, original)
    assert same.kept == 2 and same.as_dict()["map50"] == 1.0
