"""Transform: run the network at a lower resolution behind a resize at its entry.

The file's input and outputs stay as they were (a user still feeds 224 x 224); the first node
resizes the image by ``scale`` on both spatial axes (bilinear, half-pixel centres, no antialias:
``F.interpolate(x, scale_factor=scale, recompute_scale_factor=False)``, which ONNX writes as one
``Resize`` with those scales, so any input size is scaled alike). Every convolution then runs on
``scale**2`` of the pixels. Only a network whose outputs do not depend on the input's size (a
classifier that pools globally) keeps its outputs' shapes; :func:`check_resizable` says, in one
line, where another does not (a detector's anchors, a fixed reshape).

An output size is ``floor(side * scale)``; :func:`scale_for` gives the scale whose floor is the
side asked for (by a thousandth of a pixel over it), the ratio the coordinates are mapped by. A
scale is one number for both axes or a (height, width) pair: sides one pixel apart, where latency
falls in a step between two square sizes (``choose_resolution``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..errors import GraphpruneError
from ..evaluate import fx_runner
from ..formats.input_layout import is_channels_last
from ..formats.onnx_lower import RESIZED_INPUT
from ..model import Model
from .base import PassResult, Transform

Scale = float | tuple[float, float]  # both axes, or (height, width)

MIN_OPSET = 11  # Resize with half-pixel coordinates; opset 10's maps asymmetrically


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


def resize_input(model: Model, scale: Scale) -> Model:
    """A copy of ``model`` whose one image input is resized by ``scale`` before anything reads it."""
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
    new.graph_module.recompile()
    new.meta["resized_input"] = scale
    return new


def output_shapes(model: Model) -> list[tuple]:
    """The shapes of ``model``'s outputs on its example input."""
    return [tuple(t.shape) for t in fx_runner(model)(*model.example_inputs())]


def check_resizable(model: Model, resized: Model, expected: list[tuple] | None = None) -> None:
    """One line where ``resized`` does not give outputs of ``model``'s shapes (or cannot run);
    ``expected``: those shapes (:func:`output_shapes`), where a caller checks many sizes."""
    (image,) = model.example_inputs()  # resize_input takes models with one input
    size = "x".join(map(str, resized_size(image.shape, resized.meta["resized_input"])))
    try:
        got = [tuple(t.shape) for t in fx_runner(resized)(image)]
    except Exception as exc:  # a fixed pooling window or reshape that the smaller map breaks
        raise GraphpruneError(f"the network cannot run at {size} inside the graph ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no message'}): its layers fix the "
                              "input's size") from None
    expected = output_shapes(model) if expected is None else expected
    if got != expected:
        raise GraphpruneError(f"at {size} inside the graph the outputs' shapes change ({expected} -> {got}): only a "
                              "network whose outputs do not follow the input's size (a classifier that pools globally) "
                              "can run at a lower resolution")


def runs_smaller(model: Model) -> bool:
    """Whether ``model`` runs at three quarters of its side with its outputs' shapes (a classifier
    that pools globally): whether the resolution lever applies to it."""
    try:
        check_resizable(model, resize_input(model, 0.75))
    except GraphpruneError:
        return False
    return True


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
        resized = resize_input(model, choice.scale)
        check_resizable(model, resized)
        return PassResult(resized, changed=True, record={"resized": list(choice.size),
                                                         "scale": scale_record(choice.scale)})
