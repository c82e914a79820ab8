"""A detector's boxes behind a resize: which outputs hold boxes in the input's pixels, and mapping
them back to the pixels of the image the user gave.

A network run behind a resize by (s_h, s_w) (:mod:`.resize_input`) sees an image s times the
file's and writes its boxes in that image's pixels; multiplied by (1/s_w, 1/s_h, 1/s_w, 1/s_h)
they are in the file's (x1, y1, x2, y2 and cx, cy, w, h alternate x and y alike). By layout
(:func:`graphprune.fidelity.output_layout`, read from the original's outputs on real images):

* ``yolov8`` (N, 4 + C, A): rows 0-3; the anchor count A follows the input's size (a grid cell
  per stride: 2100 at 320 px, 1701 at 288), a different count that NMS reads as it reads any;
* ``yolov8_obb``: the same, the angle row unchanged; only where both axes are scaled alike (a
  rotated box stretched along one image axis is no rotated box);
* ``yolov5`` (N, A, 5 + C): columns 0-3, A following the size;
* ``detections`` / ``detections_xywh`` (N, K, 6): columns 0-3, K fixed.

Boxes in fractions of the image (RT-DETR's, as ultralytics exports them) do not change with a
resize and are left alone (their anchors may still follow the size): told apart by their values,
every box value within ``FRACTION_LIMIT`` on the images read (a box in pixels of an image larger
than a couple of pixels reaches past it). A head with an output per anchor whose boxes reach past
that but not ``DECODED_REACH`` of the image's side holds offsets decoded outside the file (on a
grid the decoder builds for the file's size, which a resize's fewer anchors would not match): it is
refused, as are an undecoded YOLOX head (:mod:`graphprune.grid_head`) and a head of class scores and
box distributions (:mod:`graphprune.distribution_head`), decoded outside the file on a grid of its
size alike. Where the images read hold no box at all (final detections, all rows 0), which they are is
unknown, and the model is refused.
An ultralytics pose or segment head's rows after its boxes and classes (keypoints in pixels, mask
coefficients with a prototype map of the input's size) are not mapped: such a model is refused.

Measured on nudenet's YOLOv8n (320 px; benchmarks/studies/results/dense_resolution.md): at 288
px a 15.8% cut keeping mAP50 0.80 of the original's detections on 800 photos (0.82 the other way),
where dropping blocks kept 0.14 at a 10% cut. A map output (PP-OCRv4's text map) resized back
kept a region IoU of 0.64 at 17% and 0.43 at 33%, under int8's 0.53: maps stay refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..detections import BOX_AXES, BOX_ROWS
from ..distribution_head import distribution_head
from ..fidelity import output_layout
from ..grid_head import grid_head

FRACTION_LIMIT = 1.5  # box values all within this: fractions of the image, unchanged by a resize
# every anchor's box is written, so boxes decoded into pixels reach across the image (a centre per
# grid cell); raw offsets and log sizes, decoded outside the file on a grid of its own, stay small
DECODED_REACH = 0.25  # of the image's shorter side
UNDECODED_DISTRIBUTIONS = ("outputs {outputs} are a detector's class scores and box distributions, which its user "
                           "decodes on a grid of the file's size: the fewer cells of a smaller size inside the graph "
                           "would not match it (export it with its post-processing)")
UNDECODED_GRID = ("output {index} is an undecoded YOLOX head, which its user decodes on a grid of the file's size: the "
                  "fewer anchors of a smaller size inside the graph would not match it (export it with its decoding: "
                  "YOLOX's --decode_in_inference)")


@dataclass(frozen=True)
class BoxOutput:
    """Output ``index`` holds boxes (``layout``): the first ``BOX_ROWS`` of the ``length`` entries
    along ``coordinate_axis``, in the input's pixels where ``pixels`` (else fractions of the image,
    left as they are); ``anchor_axis`` follows the input's size (None: a fixed count);
    ``unmappable``: why its other rows cannot follow a resize, or None; ``anchors``: how many at the
    model's size."""

    index: int
    layout: str
    length: int
    coordinate_axis: int
    anchor_axis: int | None
    unmappable: str | None = None
    pixels: bool = True
    anchors: int = 0  # the anchor axis's length at the model's size (0: a fixed count)

    @property
    def mapped(self) -> bool:
        """Whether a resize multiplies its boxes back."""
        return self.pixels and self.unmappable is None


def box_outputs(model, images: torch.Tensor | None = None) -> tuple[BoxOutput, ...]:
    """The outputs of ``model`` holding boxes, read from its outputs on ``images`` (its example
    input where None: random pixels, whose boxes land anywhere)."""
    from ..evaluate import fx_runner, head_rows

    images = model.example_inputs()[0] if images is None else images
    head = head_rows(model)
    found = []
    run = fx_runner(model)
    per_image = [run(images[i:i + 1]) for i in range(len(images))]  # one at a time: a batch may be fixed at 1
    outputs = [torch.cat(parts) for parts in zip(*per_image)]
    decoded = distribution_head(outputs, tuple(images.shape[-2:]))
    in_head = sorted({*decoded.scores, *decoded.distributions}) if decoded is not None else []
    if in_head:  # its user decodes on a grid of the file's size, as an undecoded YOLOX's
        index = decoded.scores[0]
        found.append(BoxOutput(index, "yolov8", outputs[index].shape[2], 2, 1,
                               UNDECODED_DISTRIBUTIONS.format(outputs=", ".join(map(str, in_head)))))
    for index, output in enumerate(outputs):
        if index in in_head:
            continue
        rows = head if index == 0 else None
        layout = output_layout(output, rows)
        if layout == "other" and grid_head(output, tuple(images.shape[-2:])) is not None:
            found.append(BoxOutput(index, "yolov5", output.shape[2], 2, 1, UNDECODED_GRID.format(index=index)))
            continue
        if layout not in BOX_AXES:
            continue
        coordinate_axis, anchor_axis = BOX_AXES[layout]
        boxes = output.narrow(coordinate_axis, 0, BOX_ROWS).abs()
        pixels = bool((boxes > FRACTION_LIMIT).any())
        extra = None
        if not bool((boxes > 0).any()):  # no detection on these images: pixels or fractions, unknown
            extra = (f"output {index} holds no box on the images read, so whether its boxes are in pixels (to be "
                     "mapped back) or in fractions of the image is unknown")
        reach = float(boxes.max())
        if pixels and anchor_axis is not None and reach < min(images.shape[-2:]) * DECODED_REACH:
            extra = (f"output {index}'s box values reach {reach:.3g} on a {images.shape[-2]}x{images.shape[-1]} image: "
                     "neither fractions of it nor its pixels (a head decoded outside the file?), so a resize's "
                     "anchor grid would not match its decoding")
        if rows is not None and output.shape[1] > rows.rows + rows.rotated:
            extra = (f"output {index}'s rows after its boxes and class scores (keypoints or mask coefficients, as "
                     "the file's task says) would follow the input's size, and are not mapped back")
        found.append(BoxOutput(index, layout, output.shape[coordinate_axis], coordinate_axis, anchor_axis, extra,
                               pixels, output.shape[anchor_axis] if anchor_axis is not None else 0))
    return tuple(found)


def scale_boxes(x: torch.Tensor, factors: tuple[float, ...], axis: int) -> torch.Tensor:
    """``x`` with each entry along ``axis`` multiplied by its factor (``factors``: as long as that
    axis): the fx node :func:`.resize_input.resize_input` adds, which ``formats.onnx_lower`` writes
    as one Mul."""
    shape = [1] * x.dim()
    shape[axis] = len(factors)
    return x * torch.tensor(factors, dtype=x.dtype, device=x.device).view(shape)


def box_factors(scales: tuple[float, float], length: int) -> tuple[float, ...]:
    """Factors along a box output's coordinate axis of ``length`` entries that map its boxes (x, y,
    x, y or x, y, w, h) seen at (height, width) ``scales`` back; the other entries (scores, classes,
    an angle) 1."""
    height, width = scales
    return (1.0 / width, 1.0 / height, 1.0 / width, 1.0 / height) + (1.0,) * (length - BOX_ROWS)
