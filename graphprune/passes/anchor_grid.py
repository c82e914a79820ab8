"""A detector exported at a fixed size: its anchor grid, held as constants of that size, written
again for the size it runs at behind a resize.

ultralytics' ONNX export with ``dynamic=False`` (its default) traces ``make_anchors`` at the
export's size, so the file holds the grid as constants: at 320 px a (1, 2, 2100) tensor of cell
centres, a (1, 2100) tensor of strides, and shapes holding 2100 for the reshapes of the box
distributions ((1, 4, 16, 2100)). Behind a resize the maps are smaller and those constants no longer
fit: the network runs at no smaller size. This module finds them among the fx graph's constants by
their values, not their names, and writes them for the new size:

* strides: a float constant with one axis of the A anchors (every other axis 1) whose values are
  runs of one stride S_l each, ceil(H / S_l) x ceil(W / S_l) long at the input's (H, W), in order;
* grids: a float constant whose two non-unit axes are (2, A) or (A, 2), equal to the cells'
  centres, level by level, x + 0.5 and y + 0.5 with x fastest (``make_anchors`` with offset 0.5),
  or to their corners, x and y (``GRID_OFFSETS``: YOLOX's decoding, exported with
  ``decode_in_inference``, adds a (1, A, 2) grid of corners to its offsets, then multiplies by a
  (1, A, 1) strides constant);
* shapes: a 1-d integer constant holding A once.

Each is first written again at the original size and must equal the file's exactly; a constant
with an axis of A that none of these describes leaves everything as it was (and the lever refuses
the model in one line, as before). The new values are the constants' meta (``REGRIDDED``), which
``formats.onnx_lower`` writes into the initializers they came from.
"""

from __future__ import annotations

import torch

from ..formats.onnx_lower import REGRIDDED  # Model.meta: get_attr target -> its tensor at the new size
from ..grid_head import cell_grid, level_cells
from ..ops import fetch_attr

GRID_OFFSETS = (0.5, 0.0)  # of a cell: its centre (ultralytics' make_anchors), its corner (YOLOX)


def _constants(gm) -> dict[str, torch.Tensor]:
    """Every get_attr tensor of ``gm`` by target."""
    values = {node.target: fetch_attr(gm, node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    return {target: value for target, value in values.items() if isinstance(value, torch.Tensor)}


def _levels(strides: torch.Tensor, size: tuple[int, int]) -> list[int] | None:
    """The stride of each level where ``strides`` (A values) is runs of ceil(H/S) x ceil(W/S) each."""
    values, levels, start = strides.flatten().tolist(), [], 0
    while start < len(values):
        stride = values[start]
        if stride <= 0 or stride != int(stride):
            return None
        (count,) = level_cells((int(stride),), size)
        if values[start:start + count] != [stride] * count:
            return None
        levels.append(int(stride))
        start += count
    return levels


def regridded(gm, anchors: int, size: tuple[int, int], new_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The constants of ``gm`` that hold a grid of ``anchors`` at ``size`` (height, width), written
    for ``new_size``; empty where there are none, or where one with an axis of ``anchors`` is not
    understood (module docstring)."""
    constants = {t: v for t, v in _constants(gm).items() if anchors in v.shape or
                 (v.dim() == 1 and not v.is_floating_point() and anchors in v.tolist())}
    levels = next((found for v in constants.values() if v.is_floating_point() and v.numel() == anchors
                   for found in [_levels(v, size)] if found), None)  # from the first strides constant
    if levels is None:
        return {}
    (corners, strides), (new_corners, new_strides) = cell_grid(levels, size, 0.0), cell_grid(levels, new_size, 0.0)
    new_anchors = len(new_strides)
    grids = [(corners + offset, new_corners + offset) for offset in GRID_OFFSETS]
    out = {}
    for target, value in constants.items():
        wide = [d for d in value.shape if d != 1]
        if not value.is_floating_point() and value.dim() == 1:
            if value.tolist().count(anchors) != 1:
                return {}
            out[target] = torch.where(value == anchors, torch.tensor(new_anchors, dtype=value.dtype), value)
        elif value.numel() == anchors and torch.equal(value.flatten(), strides.flatten()):
            out[target] = new_strides.to(value.dtype).view(_with(value.shape, anchors, new_anchors))
        elif wide in ([2, anchors], [anchors, 2]):
            points = value.reshape(wide) if wide[0] == anchors else value.reshape(wide).T  # (A, 2)
            new_grid = next((new for grid, new in grids if torch.equal(points, grid.to(value.dtype))), None)
            if new_grid is None:
                return {}
            new_grid = new_grid if wide[0] == anchors else new_grid.T
            out[target] = new_grid.to(value.dtype).reshape(_with(value.shape, anchors, new_anchors))
        else:
            return {}  # an axis of the anchors this module does not know how to write again
    return out


def _with(shape, old: int, new: int) -> tuple[int, ...]:
    return tuple(new if d == old else d for d in shape)


def set_constants(gm, values: dict[str, torch.Tensor]) -> None:
    """Put ``values`` (by get_attr target) into ``gm`` in place of the constants they replace."""
    for target, value in values.items():
        owner_path, _, name = target.rpartition(".")
        owner = fetch_attr(gm, owner_path) if owner_path else gm
        if name in owner._buffers:
            owner._buffers[name] = value
        else:
            setattr(owner, name, torch.nn.Parameter(value, requires_grad=False)
                    if isinstance(getattr(owner, name), torch.nn.Parameter) else value)
