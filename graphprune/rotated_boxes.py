"""Oriented boxes (cx, cy, w, h, angle in radians), as an ultralytics obb head outputs them: how much
two overlap, and non-maximum suppression among them.

The overlap is the **probabilistic IoU** (Llerena et al., "Gaussian Bounding Boxes and Probabilistic
Intersection-over-Union", 2021), the measure ultralytics' obb NMS and its ``val`` matching use, so
that a user's mAP50 and ours read the same. Each box is the Gaussian of a uniform distribution over
it: mean its centre, covariance R diag(w^2, h^2) R^T / 12 (R the rotation by its angle). Two boxes'
Bhattacharyya distance, with Sigma = (Sigma_1 + Sigma_2) / 2 and d the offset of their centres,

    B = d^T Sigma^-1 d / 8 + ln(det Sigma / sqrt(det Sigma_1 det Sigma_2)) / 2    (>= 0)

gives probiou = 1 - sqrt(1 - exp(-B)) (one minus the Hellinger distance): 1 for the same box (a
square turned by 90 degrees is itself), falling towards 0 as they part. It is not the polygons'
IoU: two equal upright boxes offset by half a width have IoU 1/3 and probiou 0.44. B is capped at
``MAX_DISTANCE`` (probiou 0 to 22 decimals); a box of zero area overlaps nothing, itself included,
as an upright one (``detections.box_iou``).
"""

from __future__ import annotations

import torch

MAX_DISTANCE = 100.0


def _covariances(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per box (n, 5): the covariance's xx, yy and xy entries, and its determinant w^2 h^2 / 144."""
    w2, h2 = boxes[:, 2].clamp(min=0) ** 2 / 12, boxes[:, 3].clamp(min=0) ** 2 / 12
    cos, sin = boxes[:, 4].cos(), boxes[:, 4].sin()
    return w2 * cos ** 2 + h2 * sin ** 2, w2 * sin ** 2 + h2 * cos ** 2, (w2 - h2) * cos * sin, w2 * h2


def probiou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) probabilistic IoU of oriented boxes ``a`` (n, 5) and ``b`` (m, 5) (module docstring)."""
    a, b = a.double(), b.double()
    xx1, yy1, xy1, det1 = (t[:, None] for t in _covariances(a))
    xx2, yy2, xy2, det2 = (t[None, :] for t in _covariances(b))
    xx, yy, xy = (xx1 + xx2) / 2, (yy1 + yy2) / 2, (xy1 + xy2) / 2
    dx, dy = a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1]
    area = (det1 > 0) & (det2 > 0)
    det = torch.where(area, xx * yy - xy ** 2, torch.ones_like(xx))  # >= sqrt(det1 det2) > 0 where both have area
    distance = ((yy * dx ** 2 + xx * dy ** 2 - 2 * xy * dx * dy) / det / 8
                + torch.log(det / torch.where(area, det1 * det2, torch.ones_like(det)).sqrt()) / 2)
    distance = distance.clamp(min=0, max=MAX_DISTANCE)
    return torch.where(area, 1 - (1 - torch.exp(-distance)).clamp(min=0).sqrt(), torch.zeros_like(distance))


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, threshold: float,
                limit: int) -> torch.Tensor:
    """Indices of the boxes (n, 5) that per-class greedy NMS keeps (a box is dropped where its
    probiou with a kept box of its class and higher score exceeds ``threshold``), highest score
    first, at most ``limit``. Each kept box is compared with the rest of its class only: memory
    grows with the candidates, not their square."""
    order = torch.argsort(scores, descending=True, stable=True)
    kept = []
    for c in torch.unique(classes).tolist():
        members = order[classes[order] == c]
        alive = torch.ones(len(members), dtype=torch.bool)
        kept_here = 0
        for i in range(len(members)):
            if not alive[i]:
                continue
            kept.append(int(members[i]))
            kept_here += 1
            if kept_here == limit:  # no more of this class can be among the highest ``limit``
                break
            rest = torch.arange(i + 1, len(members))[alive[i + 1:]]
            alive[rest[probiou(boxes[members[i]][None], boxes[members[rest]])[0] > threshold]] = False
    kept = torch.tensor(kept, dtype=torch.long)
    return kept[torch.argsort(scores[kept], descending=True, stable=True)][:limit]
