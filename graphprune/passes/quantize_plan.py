"""Choosing a quantisation by measurement: :func:`plan_quantization`.

Split from :mod:`.quantize` (the mechanism: one quantisation, used as it is by the int8 latency
backend) because this is the policy a pass wraps: every candidate of
:class:`~.quantize.QuantizeSettings` quantised, *measured* on the target by a ``measure``
callable (:func:`graphprune.backends.onnxruntime_int8.onnxruntime_cut` times it interleaved with
the float model), judged against the float model on the judge images (the pass gives the whole
tiny set, see below); the fastest within the
accuracy bound is kept, then each float group (first conv, classifier, Add/Concat merges) is tried
and kept only when the measurement says it helps; where no candidate is within the bound, the float
groups are tried on each faster candidate in turn, fastest first, until one comes within; where
still none is, the closest is trained by quantisation-aware mimicking (an ``improve`` callable the
pass gives: :mod:`.quantize_mimic`) and judged again. The judge images are the ones it trained on:
on nudenet's YOLOv8n the trained model scored 0.954 there and 0.956 on 800 photos it never saw
(mAP50 against the float model; benchmarks/studies/int8_mimic.py), so that judge was not the
optimistic one.
``plan.proto is None`` with a reason when quantisation does not pay ("auto leaves it off").

With ``max_seconds`` (optimize's ``--time-budget``) no candidate starts that would end past it, if
it takes as long as the one before (the first also computes the calibration ranges the rest
reuse): the choice is among those measured, and the reason says how many were left untried. The
first candidate always runs: a plan needs one measurement.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import torch

from ..backends.base import CutMeasurement
from ..ctc import same_text
from ..errors import GraphpruneError
from ..detections import DECODERS, DetectionCounts, lower_map50
from ..distribution_head import distribution_head
from ..fidelity import HeadRows, MapOverlap, detection_head, output_heads, output_layout, same_top_classes
from ..formats.input_shape import recorded_detection_rows
from ..formats.ort_run import cpu_session, fixed_batch, run_all_outputs
from .float_groups import float_group_nodes
from .calibration import Calibrated, as_images
from .quantize import QuantConfig, QuantizeSettings, quantization_info, quantize_onnx


@dataclass(frozen=True)
class Timing:
    """What ``measure`` returns: the cut against the float model (1 - quantised / float median,
    timed interleaved), and the medians when known."""

    cut: float
    float_ms: float | None = None
    quantized_ms: float | None = None


Measure = Callable[[onnx.ModelProto], "Timing | float"]


@dataclass
class Candidate:
    """One quantisation tried: its timing, accuracy against the float model, and what was done
    (``info``: opset, float nodes, notes). ``error`` when onnxruntime could not make it."""

    config: QuantConfig
    timing: Timing | None = None
    relative_error: float | None = None
    agreement: float | None = None
    top1: float | None = None
    within_bound: bool = False
    loss: float | None = None  # what the bound is on (the judge's metric): top-1 drop, disagreement, ...
    error: str | None = None
    info: dict = field(default_factory=dict)
    proto: onnx.ModelProto | None = field(default=None, repr=False)
    correct: np.ndarray | None = field(default=None, repr=False)  # per judged image, for paired tests
    detections: dict | None = None  # a detector's: detections.DetectionCounts.as_dict() against the float model
    map_iou: float | None = None  # a map's (segmentation, text map): fidelity.MapOverlap against the float model

    def to_dict(self) -> dict:
        timing = asdict(self.timing) if self.timing else None
        return {"config": self.config.to_dict(), "timing": timing, "relative_error": self.relative_error,
                "agreement": self.agreement, "top1": self.top1, "detections": self.detections, "map_iou": self.map_iou,
                "within_bound": self.within_bound, "loss": self.loss, "mimic": self.info.get("mimic"),
                "error": self.error, "opset": self.info.get("opset"), "float_nodes": self.info.get("float_nodes"),
                "notes": self.info.get("notes")}


@dataclass
class QuantizationPlan:
    """The chosen quantisation (``proto``/``config``; both ``None`` when quantisation does not
    pay, with the ``reason``) and every candidate measured on the way. ``alone``: the chosen
    quantisation with no block dropped, timed as block selection times its candidates (set by the
    ``plan_quantization`` pass, :func:`~.plan_quantization.measure_quantization_alone`; None here)."""

    proto: onnx.ModelProto | None
    config: QuantConfig | None
    reason: str
    metric: str
    bound: float
    candidates: list[Candidate]
    float_top1: float | None = None
    alone: CutMeasurement | None = None

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if self.config is not None and c.config == self.config), None)

    def to_dict(self) -> dict:
        chosen = self.chosen
        return {"chosen": self.config.to_dict() if self.config else None, "reason": self.reason, "metric": self.metric,
                "bound": self.bound, "float_top1": self.float_top1,
                "float_nodes": chosen.info.get("float_nodes") if chosen else None,
                "notes": chosen.info.get("notes") if chosen else None,
                "alone": self.alone.to_dict() if self.alone else None,
                "candidates": [c.to_dict() for c in self.candidates]}


# What plan_quantization calls for quantisation-aware mimicking: the candidate to improve -> the
# int8 model made from trained weights and the training's record, or None where it cannot train
Improve = Callable[["Candidate"], "tuple[onnx.ModelProto, dict] | None"]


class NoCandidate(GraphpruneError):
    """No candidate could be made or judged (each one's error; the first is the message)."""


class _TimeLimit:
    """Whether another candidate fits in ``max_seconds`` (None: always), if it takes as long as the last."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds, self.start, self.last, self.untried = max_seconds, time.perf_counter(), 0.0, 0

    def attempt(self, judge: "_Judge", prepared: Calibrated, config: QuantConfig, measure: Measure,
                first: bool = False) -> "Candidate | None":
        """``judge.evaluate`` of ``config``, or None (counted untried) where it would end past the limit."""
        begun = time.perf_counter()
        if not first and self.max_seconds is not None and begun - self.start + self.last > self.max_seconds:
            self.untried += 1
            return None
        candidate = judge.evaluate(prepared, config, measure)
        self.last = time.perf_counter() - begun
        return candidate

    def note(self) -> str:
        return (f"{self.untried} candidate(s) left untried: another would have ended past planning's time "
                f"limit of {self.max_seconds:.0f} s") if self.untried else ""


def plan_quantization(proto: onnx.ModelProto, calibration, judge_images, settings: QuantizeSettings,
                      measure: Measure, labels=None, improve: Improve | None = None,
                      max_seconds: float | None = None, output_axes: tuple[int, ...] = ()) -> QuantizationPlan:
    """Measure every candidate of ``settings`` and choose (see the module docstring): calibrated on
    ``calibration``, judged on ``judge_images`` (``labels``: theirs, or None); each is capped at
    ``max_calibration_images``, drawn with ``settings.seed``. ``improve``: where no candidate is
    within the bound, the closest is given to it, and what it returns judged as one more candidate
    (its config with ``mimic`` set; timed as the closest: the same graph with other weights).
    ``max_seconds``: no candidate after the first starts that would end past it. ``output_axes``:
    where the outputs hold their batch (``batch_axis.output_batch_axes``; () for axis 0)."""
    settings.check()
    limit = _TimeLimit(max_seconds)
    calibration, _ = _at_most(as_images(calibration), None, settings)
    prepared = Calibrated(proto, calibration, settings.batch_size)
    judge = _Judge(proto, *_at_most(as_images(judge_images, "judge_images"), labels, settings), settings, output_axes)
    tried = [c for i, config in enumerate(settings.candidates())
             if (c := limit.attempt(judge, prepared, config, measure, first=i == 0)) is not None]
    done = [c for c in tried if c.error is None]
    if not done:
        raise NoCandidate(tried[0].error)

    def plan(best: Candidate | None, reason: str) -> QuantizationPlan:
        for candidate in tried:  # only the chosen model is kept in memory
            candidate.proto = candidate.proto if candidate is best else None
        reason = "; ".join(part for part in (reason, judge.note, limit.note()) if part)
        return QuantizationPlan(best.proto if best else None, best.config if best else None, reason, judge.metric,
                                judge.bound, tried, judge.float_top1)

    def speed(candidate: Candidate) -> float:
        """The cut against the median float time of every pair timed so far, where the medians are
        known: one slow float run made its pair's cut read 82% where the file gave 70% (ResNet-18 at
        64 px, keeping the first conv in float), and a slower candidate was taken as the fastest."""
        floats = [t.timing.float_ms for t in tried if t.timing is not None and t.timing.float_ms]
        if candidate.timing.quantized_ms is None or not floats:
            return candidate.timing.cut
        return 1.0 - candidate.timing.quantized_ms / statistics.median(floats)

    faster = [c for c in done if c.timing.cut > settings.time_noise]
    if not faster:
        best_cut = max(c.timing.cut for c in done)
        return plan(None, f"every candidate measured no faster than the float model (best cut {best_cut:+.1%}); "
                          "auto leaves quantisation off")
    within = [c for c in faster if c.within_bound]
    # From the fastest within the bound; where none is, from each faster candidate in turn, fastest
    # first, until float groups bring one within (nudenet's YOLOv8n: qoperator-u8s8 with Add/Concat in
    # float stays over, mAP50 0.90 on 31 detections; qdq-u8s8, 0.6 points slower, comes within)
    starts = [max(within, key=speed)] if within else sorted(faster, key=speed, reverse=True)
    for start in starts:
        current = start
        for group in settings.float_groups:
            if not float_group_nodes(proto, group):
                continue
            trial = limit.attempt(judge, prepared, replace(current.config, float_groups=(*current.config.float_groups,
                                                                                          group)), measure)
            if trial is None:
                continue
            tried.append(trial)
            if trial.error is None and judge.better(trial, current, speed):
                current = trial
        if current.within_bound:
            break
    if not current.within_bound:
        closest = closest_candidate(tried, settings.time_noise)
        made = improve(closest) if improve is not None and closest is not None else None
        if made is not None:
            trained = judge.judge(replace(closest.config, mimic=True), made[0], closest.timing)
            trained.info["mimic"] = made[1]
            tried.append(trained)
            if trained.within_bound:
                return plan(trained, f"{trained.config.label}: within the accuracy bound after quantisation-aware "
                                     f"mimicking ({judge.metric} {closest.loss:.3f} -> {trained.loss:.3f}), cut "
                                     f"{trained.timing.cut:.1%}")
            closest = closest_candidate(tried, settings.time_noise)
        return plan(None, f"no candidate stays within the accuracy bound ({judge.metric} {judge.bound:g}; the "
                          f"closest, {closest.config.label}, {closest.loss:.3f} at a cut of {closest.timing.cut:.1%}); "
                          "auto leaves quantisation off")
    return plan(current, f"{current.config.label}: fastest within the accuracy bound, cut {speed(current):.1%}")


def closest_candidate(candidates: list[Candidate], time_noise: float) -> Candidate | None:
    """Of the candidates faster than the float model by more than ``time_noise``, the one that
    loses least (the faster on a tie); None where none is faster. What ``quantize 'int8'`` takes
    where nothing is within the bound: on nudenet's YOLOv8n the fastest, plain int8, ranks the
    float model's detections at mAP50 0.10 on 800 photos, the closest (Add/Concat and the decoding
    in float) at 0.90 (benchmarks/studies/int8_detector.py)."""
    faster = [c for c in candidates if c.error is None and c.timing is not None and c.timing.cut > time_noise
              and c.loss is not None]
    return min(faster, key=lambda c: (c.loss, -c.timing.cut)) if faster else None


def _at_most(images: torch.Tensor, labels, settings: QuantizeSettings):
    """``images`` (and their ``labels``), a seeded sample of ``max_calibration_images`` where more."""
    if len(images) <= settings.max_calibration_images:
        return images, labels
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
    pick = pick[:settings.max_calibration_images]
    return images[pick], None if labels is None else np.asarray(labels).reshape(-1)[pick.numpy()]


BOUND_ROUNDING = 1e-9
MIN_LABELLED_TOP1 = 0.5  # a guard against labels that are not the model's classes, not a measured knee


class _Judge:
    """Accuracy of candidates against the float model on the judge images, and the choice between two."""

    def __init__(self, proto, images: torch.Tensor, labels, settings: QuantizeSettings, axes: tuple[int, ...] = ()):
        self.settings, self.images, self.axes = settings, images, axes
        session = cpu_session(proto, "the float model")
        # a head decoded outside the file from several outputs (PicoDet's): judged by its detections,
        # found on one batch; other models' outputs after the first are not kept
        probe = run_all_outputs(session, images[:max(settings.batch_size, fixed_batch(session) or 0)],
                                settings.batch_size, axes)
        self.decoded = distribution_head([torch.from_numpy(o) for o in probe], tuple(images.shape[-2:]))
        self.reference = self._judged(session)
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        # an ultralytics segment, pose or obb head: its boxes and class scores judged as a detector's;
        # an undecoded YOLOX head: decoded so (grid_head.py)
        recorded = HeadRows.from_record(recorded_detection_rows(proto))
        (self.head,) = output_heads([torch.from_numpy(self.reference)], recorded, tuple(images.shape[-2:]))
        layout = output_layout(torch.from_numpy(self.reference), self.head)
        classifier = layout in ("classes", "sequence")  # judged by the top class (a recogniser: its text)
        if layout != "classes":
            self.labels = None  # labels are classes of an image, which only a (N, K) output gives
        self.float_top1, self.note = None, ""
        # a detector is judged by its detections where the float model makes some here: its whole
        # output's relative error is the boxes' (pixels), blind to class scores in [0, 1] rounded away
        self.detector = layout in DECODERS and any(
            len(d) for d in DECODERS[layout](detection_head(torch.from_numpy(self.reference), self.head)))
        self.layout = layout
        # a map is judged by the regions it marks (where the float model marks any), as its user
        # reads it, with a bound like the detector's: 1 - IoU (fidelity.MapOverlap)
        self.map = layout == "map" and bool(self.reference.any())
        if self.detector:
            self.metric, self.bound = "map50_drop", settings.max_map50_drop
        elif self.map:
            self.metric, self.bound = "map_iou_drop", settings.max_map_iou_drop
        elif self.labels is not None and self._labels_bound_top1():
            self.metric, self.bound = "top1_drop", settings.max_top1_drop
        elif classifier:
            self.metric, self.bound = "disagreement", settings.max_disagreement
        else:
            self.metric, self.bound = "relative_error", settings.max_relative_error

    def _judged(self, session) -> np.ndarray:
        """The output of ``session`` judged on the images: the first, or the detections decoded from every output."""
        outputs = run_all_outputs(session, self.images, self.settings.batch_size, self.axes,
                                  first_only=self.decoded is None)
        if self.decoded is None:
            return outputs[0]
        return self.decoded.read([torch.from_numpy(o) for o in outputs]).numpy()

    def _labels_bound_top1(self) -> bool:
        """Whether the labels can bound a drop in top-1: the float model gets at least
        ``MIN_LABELLED_TOP1`` of them right. Labels from another domain's class folders (a tiny set
        "from another domain" is the mission's case) are indices the model does not share: its top-1
        on them is near chance, int8's too, so the drop is near 0 whatever int8 changes; agreement with
        the float model then judges instead, and ``note`` says why. Sets ``float_top1`` where they can."""
        top1 = float((self.reference.argmax(1) == self.labels).mean())
        if top1 >= MIN_LABELLED_TOP1:
            self.float_top1 = top1
            return True
        self.note = (f"labels not used: the float model gets {top1:.0%} of them right, too few to bound a drop in "
                     "top-1 (not its classes?); judged by agreement with it")
        self.labels = None
        return False

    def evaluate(self, prepared: Calibrated, config: QuantConfig, measure: Measure) -> Candidate:
        try:
            quantized = quantize_onnx(prepared, config=config, device=self.settings.device)
        except GraphpruneError as exc:
            return Candidate(config, error=str(exc))
        timing = measure(quantized)
        return self.judge(config, quantized, timing if isinstance(timing, Timing) else Timing(float(timing)))

    def judge(self, config: QuantConfig, quantized: onnx.ModelProto, timing: Timing) -> Candidate:
        """The candidate ``quantized`` (made with ``config``, timed as ``timing``) against the float model."""
        out = self._judged(cpu_session(quantized))
        if out.shape != self.reference.shape:  # a size the data decides: detections after NMS
            return Candidate(config, timing, error=f"its output has shape {out.shape}, the float model's "
                             f"{self.reference.shape}: an output whose size depends on the values (detections "
                             "after non-maximum suppression) cannot be compared")
        error = float(np.linalg.norm(out - self.reference) / max(np.linalg.norm(self.reference), 1e-12))
        candidate = Candidate(config, timing, error, proto=quantized, info=quantization_info(quantized))
        if self.detector:
            counts = DetectionCounts(self.layout)
            counts.add(detection_head(torch.from_numpy(self.reference), self.head),
                       detection_head(torch.from_numpy(out), self.head))
            candidate.detections = counts.as_dict()
            candidate.loss = 1 - lower_map50(candidate.detections)
        elif self.map:
            overlap = MapOverlap()
            overlap.add(torch.from_numpy(self.reference), torch.from_numpy(out))
            candidate.map_iou = overlap.value()
            candidate.loss = 1 - candidate.map_iou
        elif self.metric == "relative_error":
            candidate.loss = error
        else:
            agrees = self._agrees(torch.from_numpy(out), torch.from_numpy(self.reference)).numpy()
            candidate.correct = out.argmax(1) == self.labels if self.labels is not None else agrees
            candidate.agreement = float(agrees.mean())
            if self.labels is not None:
                candidate.top1 = float(candidate.correct.mean())
            candidate.loss = self.float_top1 - candidate.top1 if self.labels is not None else 1.0 - candidate.agreement
        candidate.within_bound = self.within(candidate.loss)
        return candidate

    def _agrees(self, out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per image, the same top class, or for a recogniser the same CTC text (:mod:`graphprune.ctc`)."""
        texts = same_text(out, reference) if self.layout == "sequence" else None
        return texts if texts is not None else same_top_classes(out, reference)

    def within(self, loss: float) -> bool:
        """``loss`` at most the bound, up to float rounding: losses are fractions of a few hundred
        images, and 177/200 - 175/200 (EfficientNet-Lite0's int8 on its 200 tiny photos: a drop of
        exactly the 0.01 bound) is 0.010000000000000009 in floats."""
        return loss <= self.bound + BOUND_ROUNDING

    def more_accurate(self, a: Candidate, b: Candidate) -> bool:
        """``a`` beats ``b`` by more than noise: a paired sign test on the judged images
        (images only one gets right: the difference above two standard deviations), or for
        non-classifiers a loss (relative error, 1 - map IoU) lower by more than ``error_noise``; for a detector, fewer
        detections changed (lost or new) by more than two standard deviations of their count."""
        if a.detections is not None and b.detections is not None:
            changed_a, changed_b = _changed(a.detections), _changed(b.detections)
            return changed_b - changed_a > 2 * math.sqrt(changed_a + changed_b)
        if a.correct is None:
            return a.loss < (1 - self.settings.error_noise) * b.loss
        wins, losses = int((a.correct & ~b.correct).sum()), int((~a.correct & b.correct).sum())
        return wins - losses > 2 * math.sqrt(wins + losses)

    def better(self, trial: Candidate, current: Candidate, speed=lambda c: c.timing.cut) -> bool:
        """Keep ``trial`` (one more group in float)? Within the bound: when it is faster by more
        than noise without losing accuracy, or more accurate and not slower by more than noise.
        Over the bound: when it is within it, or more accurate, and still faster than the float
        model (nudenet's YOLOv8n: Add/Concat in float is more accurate yet over the bound; the
        decoding in float too brings it within, by fewer changed detections than noise).
        ``speed``: how two candidates' cuts compare (plan_quantization: against a shared float time)."""
        noise = self.settings.time_noise
        if not current.within_bound:
            return (trial.within_bound or self.more_accurate(trial, current)) and trial.timing.cut > noise
        if not trial.within_bound or self.more_accurate(current, trial):
            return False
        return (speed(trial) > speed(current) + noise
                or (self.more_accurate(trial, current) and speed(trial) >= speed(current) - noise))


def _changed(detections: dict) -> int:
    """Detections lost plus detections new."""
    return detections["original"] - detections["kept"] + detections["added"]
