"""A YOLOX head exported without its decoding, read as the detections its user decodes from it.

YOLOX's own ONNX export (``tools/export_onnx.py``) leaves the decoding out unless asked
(``decode_in_inference`` is False by default), as ddddocr's detector ships: the file's one output
is (N, A, 5 + C), per anchor

    dx, dy, log w', log h', objectness, C class scores   (the last 1 + C after their sigmoid)

with the anchors level by level (strides 8, 16, 32; a P6 model adds 64), each level's cells row
by row, x fastest. Its user decodes on a grid built for the input's size, as YOLOX's
``decode_outputs`` and ``demo_postprocess`` do: for the cell (row i, column j) of stride s,

    cx = (dx + j) * s,   cy = (dy + i) * s,   w = exp(log w') * s,   h = exp(log h') * s,

boxes in the input's pixels: the ``yolov5`` layout (:mod:`graphprune.fidelity`), read and matched
as such. Without this, such an output is ``other`` and judged by its relative error, which stays
small where detections are gone (ddddocr's YOLOX with two blocks dropped: relative error 0.048 of
the in-graph decoded output, mAP50 0.08 against the original's detections).

:func:`grid_head` recognises the layout where every one of these holds on the outputs read:

* A is the cell count of a stride set at the input's size, ceil(H / s) * ceil(W / s) summed over
  the levels (stride-2 convolutions with padding round odd sizes up);
* the columns after the box are all in [0, 1] (scores after their sigmoid);
* some size column is below 0: a log size (a decoded width or height never is; a head whose sizes
  are all >= 0 is read as decoded, ``yolov5``);
* the offsets stay within ``GRID_REACH`` cells (decoded centres in pixels reach across the image).

PicoDet's and NanoDet's undecoded heads (box distributions beside their class scores) are read by
:mod:`graphprune.distribution_head`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .detections import BOX_ROWS, within_0_1
from .errors import GraphpruneError

# a P6 model's P3-P6 levels, YOLOX's P3-P5: longest first, so that a head of four levels is not read as its
# first three where each level is an output of its own (distribution_head.py)
STRIDE_SETS = ((8, 16, 32, 64), (8, 16, 32))
GRID_REACH = 8.0  # cells: YOLOX's offsets stay within a few (its labels are assigned within 2.5)
MAX_LOG_SIZE = 20.0  # exp() of a pruned model's wild log sizes stays finite


@dataclass(frozen=True)
class GridHead:
    """An undecoded YOLOX output at an input of ``size`` (height, width) with levels ``strides``:
    :meth:`read` decodes it (module docstring)."""

    strides: tuple[int, ...]
    size: tuple[int, int]

    @property
    def anchors(self) -> int:
        return sum(level_cells(self.strides, self.size))

    def read(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` (N, A, 5 + C) with its boxes decoded into the input's pixels (cx, cy, w, h)."""
        if output.dim() != 3 or output.shape[1] != self.anchors:
            raise GraphpruneError(f"an output of shape {tuple(output.shape)} is not the undecoded YOLOX head of "
                                  f"{self.anchors} anchors read at {self.size[0]}x{self.size[1]}")
        corners, strides = cell_grid(self.strides, self.size, 0.0, output.device)
        raw = output.float()
        centres = (raw[..., :2] + corners) * strides
        sizes = raw[..., 2:BOX_ROWS].clamp(max=MAX_LOG_SIZE).exp() * strides
        return torch.cat([centres, sizes, raw[..., BOX_ROWS:]], -1)

    def describe(self) -> str:
        return (f"an undecoded YOLOX head (offsets and log sizes on a grid of strides "
                f"{', '.join(map(str, self.strides))} at {self.size[0]}x{self.size[1]}), decoded as YOLOX decodes it")


def grid_head(output: torch.Tensor, size: tuple[int, int]) -> GridHead | None:
    """The :class:`GridHead` that ``output`` (a batch of one output, read on images of ``size``) is,
    or None (module docstring)."""
    if not output.is_floating_point() or output.dim() != 3 or output.shape[2] < BOX_ROWS + 2 or output.numel() == 0:
        return None
    strides = grid_strides(output.shape[1], size)
    if strides is None:
        return None
    scores, offsets, log_sizes = output[..., BOX_ROWS:], output[..., :2], output[..., 2:BOX_ROWS]
    if not within_0_1(scores):
        return None
    if not bool((log_sizes < 0).any()) or not bool(torch.isfinite(output).all()):
        return None
    if float(offsets.abs().max()) > GRID_REACH:
        return None
    return GridHead(strides, (int(size[0]), int(size[1])))


def grid_strides(anchors: int, size: tuple[int, int]) -> tuple[int, ...] | None:
    """The stride set whose cells at an input of ``size`` number ``anchors``, or None."""
    return next((s for s in STRIDE_SETS if sum(level_cells(s, size)) == anchors), None)


def level_cells(strides: tuple[int, ...], size: tuple[int, int]) -> list[int]:
    """The cells of each level at an input of ``size``: ceil(H / s) x ceil(W / s)."""
    return [math.ceil(size[0] / s) * math.ceil(size[1] / s) for s in strides]


def cell_grid(strides: tuple[int, ...], size: tuple[int, int], offset: float,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, 2) cell positions (x, y) + ``offset`` (0: corners, 0.5: centres) in cells, level by
    level, rows of cells in order, x fastest; and (A, 1) their strides."""
    points, per_anchor = [], []
    for stride in strides:
        rows, columns = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        y, x = torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device), indexing="ij")
        points.append(torch.stack([x, y], -1).reshape(-1, 2))
        per_anchor.append(torch.full((rows * columns, 1), stride, device=device))
    return torch.cat(points).float() + offset, torch.cat(per_anchor).float()
