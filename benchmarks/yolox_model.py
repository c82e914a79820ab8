"""A YOLOX detector with real weights: ddddocr's ``common_det.onnx``, with the decoding YOLOX's own
export writes in the graph.

PyPI's ``ddddocr`` (1.6.1, MIT) ships a YOLOX (Focus stem, CSP blocks, decoupled head; 416 px, one
class: a captcha's characters) exported without its decoding (``decode_in_inference=False``): per
anchor, grid offsets, log sizes, objectness and class score, (1, 3549, 6), decoded by ddddocr's
Python on a grid it builds for 416 px. YOLOX's ``tools/export_onnx.py --decode_in_inference`` writes
the decoding into the file instead, as its ``YOLOXHead.decode_outputs`` computes it: boxes
``(xy + grid) * stride`` and ``exp(wh) * stride`` in the input's pixels, the grid of cell corners
and the strides as constants of the export's size, (1, A, 2) and (1, A, 1). :func:`decoded` appends
exactly that to the shipped file, so the benchmark has the form a user exports (and graphprune can
score as detections), from weights nobody on the team trained.

Its inputs are pixels 0-255 (ddddocr feeds the resized image as it is, no mean or std).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE

SIZE = 416
STRIDES = (8, 16, 32)


def _grid_and_strides(size: int) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX's (1, A, 2) cell corners (x, y; x fastest, level by level) and (1, A, 1) strides."""
    points, strides = [], []
    for stride in STRIDES:
        cells = size // stride
        y, x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        points.append(np.stack([x, y], -1).reshape(-1, 2))
        strides.append(np.full((cells * cells, 1), stride))
    return (np.concatenate(points)[None].astype(np.float32), np.concatenate(strides)[None].astype(np.float32))


def decoded(proto):
    """``proto`` (one output, (1, A, 5 + C) undecoded) with YOLOX's decoding appended (module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph, raw = out.graph, proto.graph.output[0].name
    grid, strides = _grid_and_strides(SIZE)
    graph.initializer.extend([numpy_helper.from_array(grid, "yolox_grid"), numpy_helper.from_array(strides, "yolox_strides")]
                             + [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                                (("yolox_0", [0]), ("yolox_2", [2]), ("yolox_4", [4]), ("yolox_end", [2 ** 62]),
                                 ("yolox_axis", [2]))])
    graph.node.extend([
        helper.make_node("Slice", [raw, "yolox_0", "yolox_2", "yolox_axis"], ["yolox_xy"], name="decode/xy"),
        helper.make_node("Slice", [raw, "yolox_2", "yolox_4", "yolox_axis"], ["yolox_wh"], name="decode/wh"),
        helper.make_node("Slice", [raw, "yolox_4", "yolox_end", "yolox_axis"], ["yolox_scores"], name="decode/scores"),
        helper.make_node("Add", ["yolox_xy", "yolox_grid"], ["yolox_cells"], name="decode/add_grid"),
        helper.make_node("Mul", ["yolox_cells", "yolox_strides"], ["yolox_centres"], name="decode/centres"),
        helper.make_node("Exp", ["yolox_wh"], ["yolox_sizes_cells"], name="decode/exp"),
        helper.make_node("Mul", ["yolox_sizes_cells", "yolox_strides"], ["yolox_sizes"], name="decode/sizes"),
        helper.make_node("Concat", ["yolox_centres", "yolox_sizes", "yolox_scores"], ["detections"],
                         name="decode/concat", axis=2)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("detections", onnx.TensorProto.FLOAT, [1, grid.shape[1], 6]))
    onnx.checker.check_model(out)
    return out


def yolox_ddddocr_shipped_onnx() -> Path:
    """ddddocr's undecoded file as it ships (``pip install --no-deps ddddocr==1.6.1``)."""
    import importlib.util

    spec = importlib.util.find_spec("ddddocr")  # not imported: its package needs opencv, the file does not
    if spec is None:
        raise SystemExit("the YOLOX detector needs ddddocr 1.6.1: pip install --no-deps ddddocr==1.6.1")
    return Path(spec.origin).parent / "common_det.onnx"


def yolox_ddddocr_onnx() -> Path:
    """The decoded YOLOX file, made once under benchmarks/cache from :func:`yolox_ddddocr_shipped_onnx`."""
    path = CACHE / "yolox_ddddocr_416.onnx"
    if path.exists():
        return path
    import onnx

    source = yolox_ddddocr_shipped_onnx()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(decoded(onnx.load(str(source))), str(tmp))
    os.replace(tmp, path)
    return path
