"""A detector's outputs as detections: decoded from each layout of :mod:`graphprune.fidelity`,
matched against the original's, and scored by mAP@0.5 with the original's as the truth.

**Detections** (``DECODERS``: ``yolov8`` and ``yolov5``, each anchor's class scores as the layouts say; a
``detections`` list is already decoded: its rows above the confidence, as they are), as
ultralytics' ``non_max_suppression`` with its defaults: each anchor's best class
c = argmax_k s_k; confident where s_c > CONFIDENCE; box (cx - w/2, cy - h/2, cx + w/2, cy + h/2),
w and h clamped at 0; non-maximum suppression within each class at NMS_IOU; at most
MAX_DETECTIONS per image, highest scores first. IoU(a, b) = |a n b| / |a u b| (0 where the union
is empty; oriented boxes: their probiou, in NMS and below).

**Matching** an image's optimised detections D to the original's O: pairs of the same class with
IoU >= MATCH_IOU, taken greedily, highest IoU first, each detection in at most one pair. Summed
over the images:

    kept  = matched pairs     kept_fraction  = kept / |O|   (the original's detections kept)
    added = |D| - kept        added_fraction = added / |D|  (the optimised model's new detections)

A fraction is None where its denominator is 0. A box of zero area overlaps nothing, itself included.

**mAP@0.5 against the original** (``map50``): the count above moves with every score that crosses
CONFIDENCE, so a model whose scores all fall a little loses "kept" detections it still ranks
first. ``map50`` is the threshold-free measure a detector's users read, with the original's
confident detections O taken as the ground truth: the optimised model's detections down to
AP_CONFIDENCE (ultralytics' ``val`` default), highest score first, each a true positive where it
pairs with a not yet paired O of its class at IoU >= MATCH_IOU (the highest such IoU), else a false
positive; per class, AP = sum over the ranked list of (r_i - r_{i-1}) * max_{j >= i} p_j (precision
p and recall r after each detection: the area under the precision envelope); ``map50`` is the mean
over the classes that O holds (None where O is empty). The original against itself scores 1.
``map50`` misses new detections ranked below the kept ones; ``map50_reverse`` swaps the roles
(the optimised model's confident detections as the truth, the original's ranked), so a confident
detection the original does not make at any score lowers it, and one the original scores just
under CONFIDENCE does not. A bound on both is a bound on detections lost and new, threshold-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rotated_boxes import probiou, rotated_nms

CONFIDENCE = 0.25  # ultralytics' predict defaults: conf, iou and max_det
NMS_IOU = 0.45
MAX_DETECTIONS = 300
MATCH_IOU = 0.5  # a detection is the original's when it overlaps it this much (the usual mAP@0.5)
AP_CONFIDENCE = 0.001  # ultralytics' val default: the ranked list that map50 is computed over
BOX_ROWS = 4  # cx, cy, w, h


@dataclass(frozen=True)
class Detections:
    """One image's confident detections: ``boxes`` (n, 4) x1, y1, x2, y2, ``scores`` and ``classes``
    (n,); oriented boxes: ``angles`` (n,), each box turned by its angle about its centre."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    angles: torch.Tensor | None = None

    def oriented(self) -> torch.Tensor:
        """(n, 5) cx, cy, w, h, angle (0 for upright boxes)."""
        angles = self.angles if self.angles is not None else torch.zeros_like(self.scores)
        centre, size = (self.boxes[:, :2] + self.boxes[:, 2:]) / 2, self.boxes[:, 2:] - self.boxes[:, :2]
        return torch.cat([centre, size, angles[:, None].to(centre.dtype)], 1)

    def subset(self, keep: torch.Tensor) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep],
                          None if self.angles is None else self.angles[keep])

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def decode_yolov8(output: torch.Tensor, confidence: float = CONFIDENCE) -> list[Detections]:
    """Each image's detections above ``confidence`` after per-class NMS, highest scores first."""
    return [_detections(image[:BOX_ROWS], image[BOX_ROWS:], confidence) for image in output.float()]


def decode_yolov5(output: torch.Tensor, confidence: float = CONFIDENCE) -> list[Detections]:
    """:func:`decode_yolov8` of an anchor-based (N, A, 5 + C) output: class scores times objectness."""
    return [_detections(image[:, :BOX_ROWS].T, (image[:, BOX_ROWS + 1:] * image[:, BOX_ROWS:BOX_ROWS + 1]).T,
                        confidence) for image in output.float()]


def decode_detections(output: torch.Tensor, confidence: float = CONFIDENCE, centred: bool = False) -> list[Detections]:
    """A ``detections`` list's rows above ``confidence``: the model ran NMS (or needs none) already."""
    images = []
    for image in output.float():
        rows = image[image[:, BOX_ROWS] > confidence]
        boxes = rows[:, :BOX_ROWS]
        if centred:
            centre, size = boxes[:, :2], boxes[:, 2:].clamp(min=0) / 2
            boxes = torch.cat([centre - size, centre + size], 1)
        images.append(Detections(boxes, rows[:, BOX_ROWS], rows[:, BOX_ROWS + 1].long()))
    return images


def decode_detections_xywh(output: torch.Tensor, confidence: float = CONFIDENCE) -> list[Detections]:
    """:func:`decode_detections` of a ``detections_xywh`` list."""
    return decode_detections(output, confidence, centred=True)


def decode_yolov8_obb(output: torch.Tensor, confidence: float = CONFIDENCE) -> list[Detections]:
    """:func:`decode_yolov8` of a ``yolov8_obb`` head (its last row the angles): per-class NMS by probiou."""
    return [_detections(image[:BOX_ROWS], image[BOX_ROWS:-1], confidence, image[-1]) for image in output.float()]


DECODERS = {"yolov8": decode_yolov8, "yolov8_obb": decode_yolov8_obb, "yolov5": decode_yolov5,
            "detections": decode_detections, "detections_xywh": decode_detections_xywh}  # layouts and decoding
# per layout: the axis whose first BOX_ROWS entries are each box's coordinates, and the axis of the
# anchors, whose count follows the input's size (None: a fixed count of final detections)
BOX_AXES = {"yolov8": (1, 2), "yolov8_obb": (1, 2), "yolov5": (2, 1), "detections": (2, None),
            "detections_xywh": (2, None)}


def within_0_1(values: torch.Tensor) -> bool:
    """Whether every value lies in [0, 1] (scores after their sigmoid, probabilities)."""
    return bool((values >= 0).all()) and bool((values <= 1).all())


def _detections(centred_boxes: torch.Tensor, class_scores: torch.Tensor, confidence: float,
                angles: torch.Tensor | None = None) -> Detections:
    """One image's detections from its anchors' boxes (4, A: cx, cy, w, h) and scores (C, A), and
    where they are oriented their angles (A,): NMS by probiou then."""
    from torchvision.ops import batched_nms

    scores, classes = class_scores.max(0)
    confident = scores > confidence
    cx, cy, w, h = centred_boxes[:, confident]
    w, h = w.clamp(min=0), h.clamp(min=0)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    found = Detections(boxes, scores[confident], classes[confident], None if angles is None else angles[confident])
    if angles is None:
        return found.subset(batched_nms(boxes, found.scores, found.classes, NMS_IOU)[:MAX_DETECTIONS])
    oriented = torch.stack([cx, cy, w, h, found.angles], 1)
    return found.subset(rotated_nms(oriented, found.scores, found.classes, NMS_IOU, MAX_DETECTIONS))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) IoU of boxes ``a`` (n, 4) and ``b`` (m, 4), x1, y1, x2, y2; 0 where the union is empty."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def overlap(a: Detections, b: Detections) -> torch.Tensor:
    """(n, m) IoU of two images' detections: probiou where they are oriented, else ``box_iou``."""
    if a.angles is None and b.angles is None:
        return box_iou(a.boxes, b.boxes)
    return probiou(a.oriented(), b.oriented()).to(a.boxes.dtype)


def matched(original: Detections, optimized: Detections) -> int:
    """How many of ``original``'s detections ``optimized`` keeps: greedy same-class pairs with
    IoU >= MATCH_IOU, highest IoU first, each detection in one pair at most."""
    iou = overlap(original, optimized)
    iou[original.classes[:, None] != optimized.classes[None, :]] = 0
    rows, columns = torch.nonzero(iou >= MATCH_IOU, as_tuple=True)  # few: NMS leaves few overlaps per box
    order = torch.argsort(iou[rows, columns], descending=True, stable=True)
    taken_rows, taken_columns = set(), set()
    for row, column in zip(rows[order].tolist(), columns[order].tolist()):
        if row not in taken_rows and column not in taken_columns:
            taken_rows.add(row)
            taken_columns.add(column)
    return len(taken_rows)


def confident(detections: Detections, confidence: float = CONFIDENCE) -> Detections:
    """Those of ``detections`` above ``confidence``: the same as decoding at it, since NMS keeps a
    box or not by the higher-scoring boxes alone."""
    return detections.subset(detections.scores > confidence)


def ranked_hits(truth: Detections, predicted: Detections) -> torch.Tensor:
    """For each of ``predicted`` (highest score first), whether it is a true positive against
    ``truth``: it pairs with a not yet paired detection of its class at IoU >= MATCH_IOU, the
    highest such IoU."""
    iou = overlap(predicted, truth)
    iou[predicted.classes[:, None] != truth.classes[None, :]] = 0
    hits = torch.zeros(len(predicted), dtype=torch.bool)
    free = torch.ones(len(truth), dtype=torch.bool)
    reaches = (iou >= MATCH_IOU).any(1)  # the others are false positives: the loop is over few
    order = torch.argsort(predicted.scores, descending=True, stable=True)
    for i in order[reaches[order]].tolist():
        candidates = torch.where(free & (iou[i] >= MATCH_IOU), iou[i], torch.full_like(iou[i], -1.0))
        if float(candidates.max()) >= MATCH_IOU:
            free[int(candidates.argmax())] = False
            hits[i] = True
    return hits


def average_precision(scores: torch.Tensor, hits: torch.Tensor, truths: int) -> float:
    """The area under the precision envelope of detections ranked by score (module docstring)."""
    order = torch.argsort(scores, descending=True, stable=True)
    true_positives = hits[order].double().cumsum(0)
    precision = true_positives / torch.arange(1, len(order) + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    recall = true_positives / truths
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * envelope).sum())


def lower_map50(detections: dict) -> float | None:
    """The lower of ``map50`` and ``map50_reverse`` in :meth:`DetectionCounts.as_dict`: detections
    lost and new in one figure. None where the original made no confident detection (nothing to
    lose); a reverse of None there means the optimised model made none, which counts as 0."""
    if detections.get("map50") is None:
        return None
    return min(detections["map50"], detections.get("map50_reverse") or 0.0)


@dataclass
class MeanAP50:
    """mAP@0.5 summed over images: the truth's detections counted per class, and each image's
    ranked detections marked true or false positive (``ranked_hits``)."""

    truths_per_class: dict = field(default_factory=dict)
    ranked: list = field(default_factory=list)  # (classes, scores, hits) of each image

    def add(self, truth: Detections, ranked: Detections) -> None:
        for c in truth.classes.tolist():
            self.truths_per_class[c] = self.truths_per_class.get(c, 0) + 1
        self.ranked.append((ranked.classes, ranked.scores, ranked_hits(truth, ranked)))

    def value(self) -> float | None:
        """The mean over the classes the truth holds; None where it holds none."""
        if not self.truths_per_class:
            return None
        classes, scores, hits = (torch.cat(parts) for parts in zip(*self.ranked))
        return sum(average_precision(scores[classes == c], hits[classes == c], n)
                   for c, n in self.truths_per_class.items()) / len(self.truths_per_class)


@dataclass
class DetectionCounts:
    """Detections summed over images: the original's, the optimised model's, the pairs kept, and
    mAP@0.5 both ways (``map50``: the optimised model's ranked against the original's confident
    detections; ``map50_reverse``: the original's ranked against the optimised model's)."""

    layout: str = "yolov8"  # a key of DECODERS
    original: int = 0
    optimized: int = 0
    kept: int = 0
    forward: MeanAP50 = field(default_factory=MeanAP50)
    reverse: MeanAP50 = field(default_factory=MeanAP50)

    def add(self, original: torch.Tensor, optimized: torch.Tensor) -> None:
        """One batch of the detector output of both models."""
        decode = DECODERS[self.layout]
        for theirs_ranked, ours_ranked in zip(decode(original, AP_CONFIDENCE), decode(optimized, AP_CONFIDENCE)):
            theirs, ours = confident(theirs_ranked), confident(ours_ranked)
            self.original += len(theirs)
            self.optimized += len(ours)
            self.kept += matched(theirs, ours)
            self.forward.add(theirs, ours_ranked)
            self.reverse.add(ours, theirs_ranked)

    def as_dict(self) -> dict:
        added = self.optimized - self.kept
        return {"original": self.original, "optimized": self.optimized,
                "kept": self.kept, "kept_fraction": self.kept / self.original if self.original else None,
                "added": added, "added_fraction": added / self.optimized if self.optimized else None,
                "map50": self.forward.value(), "map50_reverse": self.reverse.value()}
