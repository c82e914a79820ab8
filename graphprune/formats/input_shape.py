"""Which input shape a model with dynamic spatial dimensions is analysed at, and where it came from.

A shape the caller gives (``--input-shape``) wins. Otherwise a file that records its image size
gives it: ultralytics writes ``imgsz: [640, 640]`` into the ONNX ``metadata_props`` of every
detector it exports with dynamic axes. The choice is logged in one line and kept in
``model.meta["input_shape_source"]``: ``"input_shape"`` (given), ``"metadata:imgsz"`` (the file's
record) or ``"declared"`` (the file's static shape); ``None`` when none is known, and the first
run then asks for ``--input-shape`` in one line.

The file can also say how its input is normalised: every ultralytics export (``author:
Ultralytics`` in its metadata) takes RGB scaled to [0, 1], no mean or std
(:func:`recorded_normalisation`, kept in ``model.meta["recorded_normalisation"]``); the commands
use it where ``--mean``/``--std`` are not given, and say so, instead of ImageNet's (nudenet's
YOLOv8n read under ImageNet normalisation is a different input from the one it was trained on).
A file whose image input is uint8 takes pixels as they are, 0 to 255 (the graph casts and scales
them itself, as camera and edge exports do): mean 0, std 1/255 on graphprune's [0, 1] images.
Without this, ImageNet-normalised values (-2.1 to 2.6) reached a graph that divides by 255.
"""

from __future__ import annotations

import ast
import logging
import math

import onnx

from ..errors import GraphpruneError
from ..model import MAX_INPUT_ELEMENTS, InputSpec

log = logging.getLogger("graphprune")
IMAGE_SIZE_KEYS = ("imgsz",)


def resolve_input_shape(proto: onnx.ModelProto, specs: tuple[InputSpec, ...],
                        given: tuple[int, ...] | None) -> tuple[tuple[int, ...] | None, str | None]:
    """``(shape, source)`` for a model whose inputs are ``specs`` (see the module docstring)."""
    if given:
        if len(specs) == 1 and _dynamic_spatial(specs[0]):
            log.info("input shape %s from --input-shape", _fmt(given))
        return tuple(given), "input_shape"
    if len(specs) != 1 or not _dynamic_spatial(specs[0]):
        return None, ("declared" if len(specs) == 1 else None)
    size = recorded_image_size(proto)
    shape = _with_image_size(specs[0].shape, size) if size else None
    if shape is None:
        return None, None
    key = next(k for k in IMAGE_SIZE_KEYS if k in _metadata(proto))
    if math.prod(shape) > MAX_INPUT_ELEMENTS:  # said before the warning: one line in all
        raise GraphpruneError(f"the file's metadata ({key}) gives an input of {math.prod(shape):,} elements; "
                              f"graphprune handles at most {MAX_INPUT_ELEMENTS:,}: pass --input-shape",
                              parameter="input_shape")
    log.warning("input shape %s from the file's metadata (%s); pass --input-shape to use another", _fmt(shape), key)
    return shape, f"metadata:{key}"


def recorded_image_size(proto: onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) the file records (``imgsz: [640, 640]`` or ``imgsz: 640``), or None."""
    metadata = _metadata(proto)
    for key in IMAGE_SIZE_KEYS:
        if key not in metadata:
            continue
        try:
            value = ast.literal_eval(metadata[key].strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, int):
            value = [value, value]
        if isinstance(value, (list, tuple)) and len(value) in (1, 2) and \
                all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return (value[0], value[-1])
    return None


def recorded_normalisation(proto: onnx.ModelProto) -> dict | None:
    """``{"mean", "std", "source"}`` where the file's metadata says how its input is normalised
    (see the module docstring), else None."""
    if _metadata(proto).get("author", "").strip().lower() == "ultralytics":
        return {"mean": 0.0, "std": 1.0, "source": "metadata:author Ultralytics"}
    inputs = [value for value in proto.graph.input if value.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) == 1 and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8:
        return {"mean": 0.0, "std": 1 / 255, "source": "input type uint8"}
    return None


# ultralytics heads whose first output holds, after its 4 box rows and one score row per class, rows
# that are no class (mask coefficients, keypoints, a rotated box's angle)
EXTENDED_DETECT_TASKS = ("segment", "pose", "obb")
MAX_NAMES_TEXT = 1_000_000  # characters of a names entry read: a hostile file's is not parsed


def recorded_detection_rows(proto: onnx.ModelProto) -> dict | None:
    """``{"rows": 4 + classes, "task"}`` where an ultralytics file's metadata names a segment, pose or
    obb task and its classes (``names: {0: 'person', ...}``): the rows of its first output that are
    a YOLOv8 detect head's (boxes and class scores); else None."""
    metadata = _metadata(proto)
    task = metadata.get("task", "").strip()
    names = metadata.get("names", "")
    if task not in EXTENDED_DETECT_TASKS or not names or len(names) > MAX_NAMES_TEXT:
        return None
    try:
        value = ast.literal_eval(names.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if not isinstance(value, (dict, list)) or not value:
        return None
    return {"rows": 4 + len(value), "task": task}


def _metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _dynamic_spatial(spec: InputSpec) -> bool:
    return any(d is None for d in spec.shape[1:])


def _with_image_size(declared: tuple[int | None, ...], size: tuple[int, int]) -> tuple[int, ...] | None:
    """A (1, C, H, W) or, channels-last, (1, H, W, C) shape with the recorded H and W; None when
    the input is no image with a known channel count."""
    if len(declared) != 4:
        return None
    batch = declared[0] or 1
    if declared[1] is not None and declared[2] is None and declared[3] is None:
        return (batch, declared[1], *size)
    if declared[3] is not None and declared[1] is None and declared[2] is None:
        return (batch, *size, declared[3])
    return None


def _fmt(shape) -> str:
    return ",".join(map(str, shape))
