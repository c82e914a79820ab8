"""Transform: run the network at a lower resolution behind a resize at its entry.

The file's input and outputs stay as they were (a user still feeds 224 x 224); the first node
resizes the image by ``scale`` on both spatial axes (bilinear, half-pixel centres, no antialias:
``F.interpolate(x, scale_factor=scale, recompute_scale_factor=False)``, which ONNX writes as one
``Resize`` with those scales, so any input size is scaled alike). Every convolution then runs on
``scale**2`` of the pixels. A network whose outputs do not depend on the input's size (a
classifier that pools globally) keeps its outputs' shapes. A detector's boxes are mapped back to the
file's pixels (:mod:`.box_outputs`: a Mul on each box output; its anchor count follows the size);
:func:`check_resizable` says, in one line, where any other output changes shape (a map, a fixed
reshape) or the network cannot run at a size (a YOLO's neck concatenates maps of strides 16 and 32,
so it runs at 288 and 256 px but not between: ``choose_resolution`` passes over such sizes).

An output size is ``floor(side * scale)``; :func:`scale_for` gives the scale whose floor is the
side asked for (by a thousandth of a pixel over it), the ratio the coordinates are mapped by. A
scale is one number for both axes or a (height, width) pair: sides one pixel apart, where latency
falls in a step between two square sizes (``choose_resolution``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx

from ..errors import GraphpruneError
from ..evaluate import fx_runner
from ..formats.input_layout import is_channels_last
from ..formats.onnx_lower import MAPPED_BOXES, RESIZED_INPUT
from ..model import Model
from .base import PassResult, Transform
from .anchor_grid import REGRIDDED, regridded, set_constants
from .box_outputs import BoxOutput, box_factors, box_outputs, scale_boxes

Scale = float | tuple[float, float]  # both axes, or (height, width)

BOX_IMAGES = 8  # tiny images read to tell boxes in pixels from fractions of the image
MIN_OPSET = 11  # Resize with half-pixel coordinates; opset 10's maps asymmetrically


class CannotRunAt(GraphpruneError):
    """The network's layers fail at a size (a fixed reshape, a neck joining maps off its stride's
    steps), as against running there with its outputs changed."""


@dataclass(frozen=True)
class ResolutionChoice:
    """Artefact: the scale the network runs at (None: its own), the internal size at the analysis
    shape, each measured candidate (size, cut) and why."""

    scale: Scale | None
    size: tuple[int, int] | None
    measurements: list[dict]
    reason: str

    def to_dict(self) -> dict:
        return {"scale": scale_record(self.scale),
                "size": list(self.size) if self.size else None,
                "measurements": self.measurements, "reason": self.reason}


def scale_for(side: int, target: int) -> float:
    """The scale that resizes ``side`` to ``target`` pixels (floor of the product)."""
    return (target + 1e-3) / side


def scale_record(scale: Scale | None):
    """A scale as JSON holds it: a number, or a [height, width] list."""
    return list(scale) if isinstance(scale, tuple) else scale


def axis_scales(scale: Scale) -> tuple[float, float]:
    """(height, width) scales of a scale."""
    return (float(scale[0]), float(scale[1])) if isinstance(scale, (tuple, list)) else (float(scale), float(scale))


def resized_size(shape, scale: Scale) -> tuple[int, int]:
    """(height, width) of an (N, C, H, W) input after the resize."""
    height, width = axis_scales(scale)
    return int(shape[-2] * height), int(shape[-1] * width)


def resize_input(model: Model, scale: Scale, boxes: tuple[BoxOutput, ...] | None = None) -> Model:
    """A copy of ``model`` whose one image input is resized by ``scale`` before anything reads it,
    and whose ``boxes`` (:func:`.box_outputs.box_outputs`; read on its example input where None) are
    mapped back to the input's pixels."""
    scales = axis_scales(scale)
    if not all(0.0 < s <= 1.0 for s in scales) or scales == (1.0, 1.0):
        raise GraphpruneError(f"the resize scale must be in (0, 1), got {scale}")
    if is_channels_last(model):
        raise GraphpruneError("resizing inside the graph needs channels-first (N, C, H, W) input; this file takes "
                              "(N, H, W, C)")
    if model.onnx is not None and _opset(model) < MIN_OPSET:
        raise GraphpruneError(f"resizing inside the graph needs ONNX opset {MIN_OPSET} or later (half-pixel Resize); "
                              f"this file is opset {_opset(model)}")
    new = model.clone()
    graph = new.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphpruneError(f"resizing inside the graph needs one image input; this model has {len(placeholders)}")
    image = placeholders[0]
    with graph.inserting_after(image):
        resized = graph.call_function(F.interpolate, (image,), {"scale_factor": scales, "mode": "bilinear",
                                                                "align_corners": False,
                                                                "recompute_scale_factor": False})
    image.replace_all_uses_with(resized, delete_user_cb=lambda user: user is not resized)
    resized.meta[RESIZED_INPUT] = scales
    boxes = box_outputs(model) if boxes is None else boxes
    _map_boxes_back(graph, scales, [b for b in boxes if b.mapped])
    anchored = [b.anchors for b in boxes if b.anchors]
    if anchored:  # an export at a fixed size holds its anchor grid as constants of that size
        shape = model.analysis_shape()
        values = regridded(new.graph_module, anchored[0], tuple(shape[-2:]), resized_size(shape, scale))
        set_constants(new.graph_module, values)
        new.meta[REGRIDDED] = values
    new.graph_module.recompile()
    new.meta["resized_input"] = scale
    new.meta["mapped_boxes"] = boxes
    return new


def _map_boxes_back(graph, scales: tuple[float, float], boxes: list[BoxOutput]) -> None:
    """A :func:`.box_outputs.scale_boxes` node before each box output of ``graph``."""
    output = graph.output_node()
    leaves = []  # the output's nodes in the order evaluate reads its tensors (nested tuples, lists, dicts)
    fx.node.map_arg(output.args[0], leaves.append)
    replaced = {}
    for box in boxes:
        value = leaves[box.index]
        with graph.inserting_before(output):
            mapped = graph.call_function(scale_boxes, (value, box_factors(scales, box.length), box.coordinate_axis))
        mapped.meta[MAPPED_BOXES] = box.anchor_axis
        replaced[value] = mapped
    if replaced:
        output.args = (fx.node.map_arg(output.args[0], lambda node: replaced.get(node, node)),)


def output_shapes(model: Model) -> list[tuple]:
    """The shapes of ``model``'s outputs on its example input."""
    return [tuple(t.shape) for t in fx_runner(model)(*model.example_inputs())]


def check_resizable(model: Model, resized: Model, expected: list[tuple] | None = None) -> None:
    """One line where ``resized`` does not give outputs of ``model``'s shapes, but for the anchors of
    the box outputs it maps back, or cannot run, or holds boxes it cannot map back; ``expected``:
    those shapes (:func:`output_shapes`), where a caller checks many sizes."""
    (image,) = model.example_inputs()  # resize_input takes models with one input
    scale = resized.meta["resized_input"]
    size = "x".join(map(str, resized_size(image.shape, scale)))
    boxes = resized.meta.get("mapped_boxes", ())
    for box in boxes:
        if box.unmappable:
            raise GraphpruneError(f"the network cannot run at a lower resolution inside the graph: {box.unmappable}")
        if box.layout == "yolov8_obb" and box.pixels and len(set(axis_scales(scale))) > 1:
            raise GraphpruneError(f"at {size} inside the graph the oriented boxes of output {box.index} would be "
                                  "stretched along one image axis: they follow only a resize alike on both")
    try:
        got = [tuple(t.shape) for t in fx_runner(resized)(image)]
    except Exception as exc:  # a fixed pooling window or reshape that the smaller map breaks
        raise CannotRunAt(f"the network cannot run at {size} inside the graph ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no message'}): its layers fix the "
                          "input's size") from None
    expected = output_shapes(model) if expected is None else expected
    anchors = {box.index: box.anchor_axis for box in boxes if box.anchor_axis is not None}
    if _without_anchors(got, anchors) != _without_anchors(expected, anchors):
        raise GraphpruneError(f"at {size} inside the graph the outputs' shapes change ({expected} -> {got}): only a "
                              "network whose outputs do not follow the input's size (a classifier that pools globally, "
                              "a detector's boxes) can run at a lower resolution")


def _without_anchors(shapes: list[tuple], anchors: dict[int, int]) -> list[tuple]:
    """``shapes`` with the anchor axis of each box output (by index) left out: it follows the size."""
    return [tuple(d for axis, d in enumerate(shape) if axis != anchors.get(i)) for i, shape in enumerate(shapes)]


SMALLER_SHARES = (0.75, 0.8, 0.5)  # of the side: a YOLO at 320 px runs at 256 and 160, not at 240
ALIGNMENTS = (2, 4, 8, 16, 32, 64)  # the total strides a network's joined maps may need


def aligned_sides(side: int, lowest: int = 1) -> list[int]:
    """``side``, then ``side`` rounded down to a multiple of each of ``ALIGNMENTS`` (no smaller than
    ``lowest``), each once: the sizes to try, in turn, where a network cannot run at ``side``. One
    whose maps halve and are then joined runs only at multiples of its total stride: YOLOX's Focus
    (odd and even pixels side by side) and its 32 px neck at 416 px run at 384, at no size from 385
    to 415, so the lever's 15-pixel steps from 416 would find none."""
    sides = [side]
    for alignment in ALIGNMENTS:
        aligned = side - side % alignment
        if lowest <= aligned < sides[-1]:
            sides.append(aligned)
    return sides


def runs_smaller(model: Model) -> bool:
    """Whether ``model`` runs at one of ``SMALLER_SHARES`` of its side (or one of its
    :func:`aligned_sides`) with its outputs' shapes (a classifier that pools globally; a detector,
    its boxes mapped back): whether the resolution lever applies to it."""
    return why_not_smaller(model) is None


def why_not_smaller(model: Model) -> str | None:
    """None where :func:`runs_smaller`, else why not: the refusal of the first size that ran (its
    outputs changed, or boxes it cannot map back), else of the first size tried."""
    side = int(model.analysis_shape()[-2])
    boxes, expected = box_outputs(model), output_shapes(model)
    refusals = []
    for smaller in dict.fromkeys(s for share in SMALLER_SHARES for s in aligned_sides(round(side * share))):
        try:
            check_resizable(model, resize_input(model, scale_for(side, smaller), boxes), expected)
        except GraphpruneError as exc:
            refusals.append(exc)
            continue
        return None
    ran = [exc for exc in refusals if not isinstance(exc, CannotRunAt)]
    return str((ran or refusals)[0]) if refusals else "no smaller size to try"


def resolution_hint(model: Model) -> str:
    """``"; resolution may reach it ..."`` where :func:`runs_smaller`, else ``""``: what an
    unreachable target's line adds for a model with too few blocks."""
    if not runs_smaller(model):
        return ""
    return "; resolution may reach it (lever 'resolution': the network at a lower resolution inside the graph)"


def _opset(model: Model) -> int:
    return next((o.version for o in model.onnx.proto.opset_import if o.domain in ("", "ai.onnx")), 0)


class ResizeInput(Transform):
    """Resize the input by the :class:`ResolutionChoice`'s scale (none: the model as it is)."""

    name = "resize_input"
    requires = (ResolutionChoice,)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        choice = inputs[ResolutionChoice]
        if choice.scale is None:
            return PassResult(model, changed=False, record={"resized": None, "skipped": choice.reason})
        resized = resize_input(model, choice.scale, tiny_boxes(model, ctx))
        check_resizable(model, resized)
        mapped = [f"output {b.index}" for b in resized.meta["mapped_boxes"] if b.mapped]
        return PassResult(resized, changed=True, record={"resized": list(choice.size),
                                                         "scale": scale_record(choice.scale),
                                                         "boxes_mapped_back": mapped})


def tiny_boxes(model: Model, ctx) -> tuple[BoxOutput, ...]:
    """:func:`.box_outputs.box_outputs` read on the first ``BOX_IMAGES`` tiny images where the run
    has them (real images: a detector's boxes on random pixels may all fall in one corner), else
    on the example input."""
    tiny = getattr(ctx, "tiny", None)
    return box_outputs(model, tiny.images[:BOX_IMAGES] if tiny is not None and len(tiny) else None)
