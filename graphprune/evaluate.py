"""How well a model does on an evaluation set, and how faithfully it reproduces a reference (the
original): the fx graph (:func:`evaluate`) or a written ONNX file as onnxruntime runs it
(:func:`evaluate_onnx`, for an int8 model that only exists as ONNX), with the same metrics.

Every output of the model (a tuple output is several) is read by its layout, taken from the
reference's output (the model's own without one; :mod:`graphprune.fidelity`), and scored:

* every output, with a reference: ``relative_error`` = ||y - y_ref|| / ||y_ref||, norms over all
  the images (None where y_ref is 0);
* class scores (N, K): ``top1`` where the set has labels (below K), ``agreement`` of the top
  class with the reference's and ``kl``, the mean KL(reference || model) of the class
  distributions (what ``lever="auto"`` compares the levers by);
* a class per position (N, T, K), with a reference: ``agreement``, the images whose top class
  agrees at every position, ``positions_agreement``, and ``ctc``: the outputs read as CTC text,
  the images that read the same text and the character error rate against the reference's;
* YOLOv8 detections (N, 4 + C, A), and YOLOv5-style ones (N, A, 5 + C): ``detections``, the
  reference's confident detections the model keeps and those it adds, mAP50 both ways (a count of
  its own without a reference);
* maps of values in [0, 1] (N, C, H, W), with a reference: ``map_iou``, the IoU of the regions the
  two maps mark with the threshold integrated out.
* a detector whose decoding its file leaves out, over several outputs (PicoDet's per-level scores
  and box distributions, :mod:`graphprune.distribution_head`): one more output, ``DECODED_NAME``,
  its decoded detections, scored as a YOLOv8 head's (the outputs themselves by their relative error).

The result: ``{"images", "outputs": {name: {"layout", ...}}}`` and, for the first output that has
each, ``top1``, ``agreement``, ``detections`` and ``map_iou`` at the top. A labelled set for a model without
class scores (a detector) is one line: labels cannot be scored against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .data import TinySet
from .data_sources import is_class_index
from .ctc import CtcText
from .distribution_head import DistributionHead, distribution_head
from .errors import GraphpruneError
from .detections import BOX_AXES, BOX_ROWS, CONFIDENCE, DECODERS, MATCH_IOU, MAX_DETECTIONS, NMS_IOU, DetectionCounts
from .fidelity import Head, HeadRows, MapOverlap, class_kl, detection_head, output_heads, output_layout, same_top_classes
from .grid_head import GridHead
from .formats.batch_axis import batch_first, output_batch_axes
from .formats.input_shape import recorded_detection_rows
from .model import Model

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # one batch of images -> every output
BATCH_ELEMENTS = 2**23  # input floats per batch: 250 CIFAR images, 55 at 224 px, 6 at 640 px
MAX_BATCH = 250
HEADLINE = ("top1", "agreement", "detections", "map_iou")
DECODED_NAME = "decoded detections"  # the scored output distribution_head.py decodes from several


def evaluate(model: Model, data: TinySet, reference: Model | None = None, batch_size: int | None = None) -> dict:
    """The model's metrics on ``data`` (see the module docstring), compared with ``reference``'s outputs."""
    return _evaluate(fx_runner(model), None, list(model.output_names), data, reference, batch_size,
                     head_rows(reference or model))


def evaluate_onnx(proto: onnx.ModelProto, data: TinySet, reference: Model | None = None,
                  batch_size: int | None = None) -> dict:
    """:func:`evaluate` for an ONNX model run by onnxruntime on the CPU, fed in the file's own
    input layout and type (``ort_feeds``); a file with a fixed batch runs whole batches of it
    only, so the images it leaves over are not counted."""
    from .formats.ort_run import cpu_session, fixed_batch, image_batches

    session = cpu_session(proto)

    axes = output_batch_axes(reference) if reference is not None else ()  # the written file's are the original's

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (feeds,) = image_batches(session, images, len(images))  # one batch: a multiple of a fixed one
        return batch_first(tuple(torch.from_numpy(np.asarray(out)) for out in session.run(None, feeds)), axes)

    rows = head_rows(reference) if reference is not None else HeadRows.from_record(recorded_detection_rows(proto))
    return _evaluate(run, fixed_batch(session), [o.name for o in session.get_outputs()], data, reference, batch_size,
                     rows)


def evaluate_written(model: Model, int8: onnx.ModelProto | None, data: TinySet, reference: Model | None = None) -> dict:
    """:func:`evaluate` of what ``optimize`` writes: the int8 ONNX file where one was made (as
    onnxruntime runs it), else the model."""
    return evaluate_onnx(int8, data, reference) if int8 is not None else evaluate(model, data, reference)


def check_eval_data(model: Model, data: TinySet) -> None:
    """Refuse, before anything long runs, a set the model's outputs cannot be scored on (labels
    for a model without class scores, labels beyond its classes): the model runs on two images."""
    outputs = fx_runner(model)(data.images[:2])
    _scores(outputs, list(model.output_names), data, compare=False, head_rows=head_rows(model))


def head_rows(model: Model) -> HeadRows | None:
    """The rows of the model's first output that are a YOLOv8 head's, where its file says so
    (``formats.input_shape.recorded_detection_rows``: an ultralytics segment, pose or obb export)."""
    return HeadRows.from_record(model.meta.get("detection_rows"))


@dataclass
class _OutputScore:
    """One output's metrics, summed batch by batch (a detector's outputs are too large to keep)."""

    name: str
    layout: str
    description: str
    score_labels: bool
    compare: bool
    head: Head | None = None  # how its detections are read (fidelity.detection_head)
    correct: int = 0
    agree: int = 0
    kl_sum: float = 0.0  # KL(original || this) of the class distributions, summed over the images
    positions: int = 0  # a sequence's positions compared, and those whose top class agrees
    positions_agree: int = 0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    own_detections: int = 0
    anchors_differ: bool = False  # the model's anchor count is not the original's (run at another size)
    detections: DetectionCounts = field(default_factory=DetectionCounts)
    overlap: MapOverlap = field(default_factory=MapOverlap)
    text: CtcText = field(default_factory=CtcText)

    def __post_init__(self):
        if self.layout in DECODERS:
            self.detections = DetectionCounts(self.layout)

    def add(self, output: torch.Tensor, reference: torch.Tensor | None, labels: torch.Tensor) -> None:
        if reference is not None and output.shape != reference.shape:
            if not anchors_differ(self.layout, output, reference):
                raise GraphpruneError(f"output '{self.name}' has shape {tuple(output.shape)}; "
                                      f"the original's has {tuple(reference.shape)}")
            self.anchors_differ = True  # a detector run smaller: its detections compare, its tensors do not
        elif reference is not None:
            self.squared_error += float(((output.double() - reference.double()) ** 2).sum())
            self.squared_norm += float((reference.double() ** 2).sum())
        if self.layout == "classes":
            top = output.argmax(1)
            self.correct += int((top == labels).sum()) if self.score_labels else 0
            if reference is not None:
                self.agree += int(same_top_classes(output, reference).sum())
                self.kl_sum += class_kl(output, reference) * len(output)
        elif self.layout == "sequence" and reference is not None:
            self.agree += int(same_top_classes(output, reference).sum())
            self.positions += output.shape[0] * output.shape[1]
            self.positions_agree += int((output.argmax(-1) == reference.argmax(-1)).sum())
            self.text.add(reference, output)
        elif self.layout in DECODERS and reference is not None:
            self.detections.add(detection_head(reference, self.head), detection_head(output, self.head))
        elif self.layout in DECODERS:
            self.own_detections += sum(len(d) for d in DECODERS[self.layout](detection_head(output, self.head)))
        elif self.layout == "map" and reference is not None:
            self.overlap.add(reference, output)

    def result(self, images: int) -> dict:
        result: dict = {"layout": self.description}
        if self.compare and self.anchors_differ:
            result["relative_error"] = None
            result["anchors_differ"] = True
        elif self.compare:
            result["relative_error"] = (self.squared_error / self.squared_norm) ** 0.5 if self.squared_norm else \
                (0.0 if self.squared_error == 0 else None)
        if self.layout == "classes" and self.score_labels:
            result["top1"] = self.correct / images
        if self.layout in ("classes", "sequence") and self.compare:
            result["agreement"] = self.agree / images
        if self.layout == "classes" and self.compare:
            result["kl"] = self.kl_sum / images
        if self.layout == "sequence" and self.compare:
            result["positions_agreement"] = self.positions_agree / self.positions
            result["ctc"] = self.text.as_dict()
        if self.layout in DECODERS:
            result["detections"] = self.detections.as_dict() if self.compare else {"count": self.own_detections}
        if self.layout == "map" and self.compare:
            result["map_iou"] = self.overlap.value()
        return result


def anchors_differ(layout: str, output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether two outputs of a detection ``layout`` differ in shape only along its anchor axis:
    the same detector run at another size inside the graph (``passes/box_outputs.py``)."""
    axis = BOX_AXES.get(layout, (None, None))[1]
    return (axis is not None and output.dim() == reference.dim()
            and all(a == b for i, (a, b) in enumerate(zip(output.shape, reference.shape)) if i != axis))


def _evaluate(run: Runner, fixed: int | None, names: list[str], data: TinySet, reference: Model | None,
              batch_size: int | None, rows: HeadRows | None = None) -> dict:
    step = fixed or batch_size or max(1, min(MAX_BATCH, BATCH_ELEMENTS // max(1, data.images[0].numel())))
    count = len(data) - (len(data) % fixed if fixed else 0)
    if count == 0:
        raise GraphpruneError(f"the model's fixed batch of {fixed} is more than the {len(data)} evaluation images")
    run_reference = fx_runner(reference) if reference is not None else None
    scores: list[_OutputScore] = []
    decoded: DistributionHead | None = None  # detections decoded from several outputs, scored as one more
    for start in range(0, count, step):
        images, labels = data.images[start:start + step], data.labels[start:start + step]
        outputs = run(images)
        expected = run_reference(images) if run_reference is not None else None
        if not scores:  # layouts from the reference's outputs, which the model's must match
            basis = outputs if expected is None else expected
            original_count, decoded = len(basis), distribution_head(basis, tuple(images.shape[-2:]))
        if len(outputs) != original_count:
            raise GraphpruneError(f"the model has {len(outputs)} outputs; the original has {original_count}")
        outputs = _with_decoded(outputs, decoded)
        expected = None if expected is None else _with_decoded(expected, decoded)
        if not scores:
            scores = _scores(outputs if expected is None else expected, [*names, DECODED_NAME] if decoded else names,
                             data, compare=expected is not None, head_rows=rows)
            if decoded is not None:
                scores[-1].description = f"{decoded.describe()}: {scores[-1].description}"
        for i, (score, output) in enumerate(zip(scores, outputs)):
            score.add(output, None if expected is None else expected[i], labels)
    per_output = {score.name: score.result(count) for score in scores}
    result: dict = {"images": count}
    for key in HEADLINE:
        first = next((r[key] for r in per_output.values() if key in r), None)
        if first is not None:
            result[key] = first
    result["outputs"] = per_output
    return result


def _with_decoded(outputs: tuple[torch.Tensor, ...], decoded: DistributionHead | None) -> tuple[torch.Tensor, ...]:
    return outputs if decoded is None else (*outputs, decoded.read(outputs))


def _scores(outputs: tuple[torch.Tensor, ...], names: list[str], data: TinySet, compare: bool,
            head_rows: HeadRows | None = None) -> list[_OutputScore]:
    """An accumulator per output, by its layout (``head_rows``: of the first output, where the file
    says so); labels only where they can be scored (one line otherwise)."""
    names = names if len(names) == len(outputs) and len(set(names)) == len(names) else \
        [f"output{i}" for i in range(len(outputs))]
    rows = output_heads(outputs, head_rows, tuple(data.images.shape[-2:]) if data.images.dim() == 4 else None)
    layouts = [output_layout(out, r) for out, r in zip(outputs, rows)]
    labelled = data.has_labels
    if labelled and "classes" not in layouts:
        shapes = ", ".join(f"'{n}' {_shape(out)}" for n, out in zip(names, outputs))
        raise GraphpruneError(f"{data.source} has class labels, but no output of the model is class scores (N, K) "
                              f"({shapes}): labels cannot be scored against a detector; give the images without "
                              "labels (a folder without labels.csv or class sub-folders, an .npz without 'labels') "
                              "to compare the optimised model's outputs with the original's")
    most = int(data.labels.max()) if labelled else -1
    widths = [out.shape[1] for layout, out in zip(layouts, outputs) if layout == "classes"]  # class counts
    if labelled and not any(width > most for width in widths):
        raise GraphpruneError(f"{data.source} has labels up to {most}, but the model's class scores have "
                              f"{max(widths)} classes")
    named = [c for c in data.classes if not is_class_index(c)]
    if labelled and named and len(data.classes) not in widths:
        shown = ", ".join(data.classes[:3]) + (", ..." if len(data.classes) > 3 else "")
        raise GraphpruneError(f"{data.source}'s {len(data.classes)} class folders ({shown}) are read in sorted order "
                              f"as classes 0..{len(data.classes) - 1}, but the model has {max(widths)} classes: name "
                              "each folder by its class index (e.g. 3/, 5/), or give a labels.csv")
    return [_OutputScore(name, layout, describe_layout(layout, out, r),
                         score_labels=layout == "classes" and labelled and out.shape[1] > most, compare=compare,
                         head=r if layout in ("yolov8", "yolov8_obb") or isinstance(r, GridHead) else None)
            for name, layout, out, r in zip(names, layouts, outputs, rows)]


def describe_layout(layout: str, output: torch.Tensor, head: Head | None = None) -> str:
    """The report's words for how an output of this layout is read (the decoding used)."""
    if isinstance(head, GridHead):
        return f"{head.describe()}: {describe_layout(layout, head.read(output))}"
    if head is not None and layout in ("yolov8", "yolov8_obb") and output.shape[1] > head.rows + head.rotated:
        extra = output.shape[1] - head.rows - head.rotated
        return (f"{describe_layout(layout, detection_head(output, head))}; its other {extra} rows (mask "
                "coefficients or keypoints, as the file's task says) by the relative error only")
    rest = ", ".join(str(d) for d in output.shape[1:])
    if layout == "yolov8_obb":
        classes, anchors = output.shape[1] - BOX_ROWS - 1, output.shape[2]
        return (f"YOLOv8 oriented detections (N, 4+{classes}+1, {anchors} anchors): cx, cy, w, h, {classes} class "
                f"scores, angle; confidence > {CONFIDENCE}, per-class NMS at probabilistic IoU {NMS_IOU}, at most "
                f"{MAX_DETECTIONS}, matched at probabilistic IoU >= {MATCH_IOU} (ultralytics' obb measure)")
    if layout == "classes":
        return f"class scores (N, {rest}): top-1"
    if layout == "sequence":
        return (f"a class per position (N, {rest}): the top class at every position, and as CTC text (runs "
                "collapsed, the most frequent class as the blank)")
    if layout == "yolov8":
        classes, anchors = output.shape[1] - BOX_ROWS, output.shape[2]
        return (f"YOLOv8 detections (N, 4+{classes}, {anchors} anchors): cx, cy, w, h, {classes} class scores; "
                f"confidence > {CONFIDENCE}, per-class NMS at IoU {NMS_IOU}, at most {MAX_DETECTIONS}, "
                f"matched at IoU >= {MATCH_IOU}")
    if layout == "yolov5":
        anchors, classes = output.shape[1], output.shape[2] - BOX_ROWS - 1
        return (f"YOLOv5-style detections (N, {anchors} anchors, 5+{classes}): cx, cy, w, h, objectness, {classes} "
                f"class scores (score = objectness x class score); confidence > {CONFIDENCE}, per-class NMS at IoU "
                f"{NMS_IOU}, at most {MAX_DETECTIONS}, matched at IoU >= {MATCH_IOU}")
    if layout in ("detections", "detections_xywh"):
        box = "x1, y1, x2, y2" if layout == "detections" else "cx, cy, w, h"
        return (f"final detections (N, {output.shape[1]}, 6): {box}, score, class, as the model ranks "
                f"them (end-to-end head or embedded NMS); confidence > {CONFIDENCE}, matched at IoU >= {MATCH_IOU}")
    if layout == "map":
        return f"map of values in [0, 1] (N, {rest}): IoU of the regions, thresholds integrated out"
    return f"other (N, {rest}): relative error only"


def _shape(output: torch.Tensor) -> str:
    return "(N, " + ", ".join(str(d) for d in output.shape[1:]) + ")"


def fx_runner(model: Model) -> Runner:
    """``run(images)``: every output tensor of the fx graph on one batch, in eval mode, no grad, each
    batch first (a (T, N, C) output read as (N, T, C): ``batch_axis.output_batch_axes``)."""
    gm = model.graph_module
    axes = output_batch_axes(model)

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                return batch_first(_tensors(gm(images)), axes)
        finally:
            gm.train(was_training)

    return run


def _tensors(output) -> tuple[torch.Tensor, ...]:
    """Every tensor of a (possibly nested) output, in order."""
    if isinstance(output, torch.Tensor):
        return (output,)
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return tuple(t for item in items for t in _tensors(item))
