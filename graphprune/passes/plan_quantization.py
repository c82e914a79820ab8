"""One latency target over block dropping *and* int8: plan the quantisation, measure as it will run.

    find_blocks -> plan_quantization -> add_layers -> profile_blocks -> ... -> recover -> quantize_result -> measure_result

* :class:`PlanQuantization` (analysis -> :class:`~.quantize_plan.QuantizationPlan`) plans int8 on the
  float original with :func:`~.quantize_plan.plan_quantization`: calibrated on ``ctx.tiny`` and
  judged on all of it, every candidate timed interleaved with the float original on ``ctx.latency``
  (:func:`~graphprune.backends.onnxruntime_int8.onnxruntime_cut`). All of it, not the held-out part:
  calibration reads every tiny image, so the held-out images are no less in-sample, only fewer.
  Measured on nudenet's YOLOv8n (200 ImageNet photos, 800 others as the truth;
  benchmarks/studies/int8_detector.py): int8 with Add/Concat in float scored mAP50 0.978 (lower of both ways 0.973)
  on the 40 held-out photos, 0.838 on all 200, 0.901 on the 800 (a drop of 0.10, over the 0.05
  bound the 40 had passed); percentile ranges, better than MinMax there by 1-3 points on the 800 for
  every config tried, were better on the 200 and worse on the 40 (on EfficientNet-Lite0 they lost
  0.75 points of top-1 on its 800 where MinMax gained 0.13, benchmarks/studies/int8_ranges.py: the
  plan keeps MinMax). Mode ``"auto"`` keeps the plan's
  answer: where it has no config (no candidate faster, or none within the accuracy bound, or int8
  cannot run at all: a backend other than onnxruntime, too few images, see
  :func:`auto_unavailable`) the rest of the pipeline runs float-only and the plan's ``reason`` says
  why. Mode ``"int8"`` uses the fastest measured candidate even then, and says so; where int8
  cannot run it refuses in one line before anything is measured.
* **GPU targets** (a CUDA latency device): int8 gains little on onnxruntime's CUDA provider without
  TensorRT, half precision is the lever there, so ``"auto"`` plans float16 instead
  (:meth:`~.quantize.QuantizeSettings.candidates`): the same measurement on the target, the same
  judge and float groups, no calibration or mimicking; everything below holds with "int8" read as
  "float16". Mode ``"int8"`` on a CUDA target is refused in one line.
* **The quantised-measurement rule** (:func:`measuring_backend`, the one place it lives): where a
  usable plan is present, every pass that measures latency times candidates *as they will run*,
  quantised with the plan's config (:class:`~graphprune.backends.onnxruntime_int8.QuantizedOnnxRuntime`,
  calibrated on the first ``TIMING_CALIBRATION_IMAGES`` tiny images, for speed: each timed model is
  quantised afresh). Per-block savings compare the quantised original with the quantised model
  without the block; a selection's cut compares the quantised candidate with the *float* original,
  so quantisation's own cut counts toward the target.
* **Quantisation alone first** (:func:`measure_quantization_alone`, the one place it is measured):
  right after planning, the plan's quantisation with no block dropped is timed against the float
  original as selection times its candidates, cached with the measured block sets (so a resumed
  run makes the same choice), and kept in the plan (``QuantizationPlan.alone``). Where it reaches
  the goal (:func:`no_block_needed`), profile_blocks, score_recoverability, select_blocks and
  refine_selection skip their block work, each record saying why: nothing is profiled, scored,
  dropped or trained. On a CPU with VNNI int8 alone cuts CIFAR ResNet-56 by more than half (54.7%,
  :mod:`.quantize`), so at such targets that work was minutes spent on a choice already made.
* :class:`~.quantize_result.QuantizeResult` quantises the recovered model with the plan's config
  (:mod:`.quantize_result`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import onnx

from ..backends.base import CutMeasurement, LatencyBackend
from ..errors import GraphpruneError
from ..formats.batch_axis import output_batch_axes
from ..formats.model_io import to_onnx
from ..model import Model
from .base import Analysis, PassResult
from .calibration import MIN_CALIBRATION_IMAGES, Calibrated
from .quantize import QuantConfig, QuantizeSettings, check_int8_device, is_cuda, quantize_onnx
from .quantize_mimic import MimicSettings, mimic_quantized, with_mimic_record
from .quantize_plan import NoCandidate, QuantizationPlan, closest_candidate, plan_quantization
from .selection import goal_cut

QUANTIZE_MODES = ("auto", "int8", "none")
# Images each *timed* candidate is calibrated on: the fewest quantize_onnx takes. Latency depends on
# the graph quantize_static makes, not on the ranges' values, and calibration is most of the time of
# QuantizedOnnxRuntime.prepare, which quantises every candidate afresh. Measured on this 2-core EPYC
# (ResNet-20 ONNX, batch 1, 1 thread, three interleaved pairs of 1 s): the int8 model calibrated on
# 64 images ran -0.9%, -0.3%, +0.3% against the one calibrated on 16 (noise), prepared in 1.0-1.2 s
# against 0.7-0.9 s.
TIMING_CALIBRATION_IMAGES = MIN_CALIBRATION_IMAGES
# The resume cache of measured block sets, keyed by "|".join(names) (select_blocks, refine_selection):
# quantisation alone is its empty set, so a run resumed from an older cache reads the same figure.
SELECTION_CACHE = "selection"
# With a --time-budget: the plan's candidates may take this share of the time left when planning
# starts, and its quantisation-aware mimicking this share of the time left when it starts (where
# either brings int8 within the bound, int8 alone usually reaches the target and no block work
# follows). Guards, not knees: a YOLOv8n planned for 410 s of a 300 s budget on a loaded machine
# before the candidates had one.
PLAN_SHARE = 0.5
MIMIC_SHARE = 0.5
EMPTY_SET = ""


def check_quantize_mode(mode: str) -> None:
    """The one rule for the quantisation mode."""
    if mode not in QUANTIZE_MODES:
        raise GraphpruneError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got '{mode}'", parameter="quantize")


def check_int8_run(ctx, by: str, half: bool = False) -> None:
    """Refuse, in one line, an int8 run that cannot happen: a CUDA target (fp16 instead), another
    backend than onnxruntime, a model whose input is not floating point (calibration feeds it
    images as floats), or a tiny set too small to calibrate on and judge (``half``: a
    float16 run, which a CUDA target takes, the rest alike)."""
    if not half:
        check_int8_device(ctx.latency.device)
    backend = ctx.need("backend", by)
    if backend.name != "onnxruntime":
        raise GraphpruneError(f"int8 quantisation is timed and written for onnxruntime; backend '{backend.name}' "
                              "cannot run it: use the onnxruntime backend or quantize 'none'", parameter="backend")
    original = getattr(ctx, "original", None)
    if original is not None and not all(x.is_floating_point() for x in original.example_inputs()):
        kinds = ", ".join(str(x.dtype).replace("torch.", "") for x in original.example_inputs())
        raise GraphpruneError(f"int8 is calibrated on images fed as floats, and this model's input is {kinds}: "
                              "quantize 'none'", parameter="quantize")
    check_enough_images(ctx, "tiny", by)


def auto_unavailable(ctx, by: str) -> str | None:
    """Why mode ``"auto"`` cannot quantise here (the line :func:`check_int8_run` refuses
    ``quantize 'int8'`` with; on a CUDA target, where auto plans float16, the device is no reason),
    or None: auto then leaves quantisation off and runs float, saying why, instead of failing."""
    try:
        check_int8_run(ctx, by, half=is_cuda(ctx.latency.device))
    except GraphpruneError as refused:
        return str(refused)
    return None


def _unwritable(ctx) -> str | None:
    """Why ``auto`` should not quantise what will be written as a PyTorch program (an int8 model is
    ONNX only; ``int8`` quantises anyway and :func:`~graphprune.optimize.write_result` says where
    the ONNX went)."""
    if getattr(ctx.config, "output_format", "onnx") == "pt2":
        return "the output is .pt2 and an int8 model is ONNX (-o NAME.onnx allows it)"
    return None


def check_enough_images(ctx, name: str, by: str) -> None:
    images = len(ctx.need(name, by))
    if images < MIN_CALIBRATION_IMAGES:
        raise GraphpruneError(f"int8 quantisation needs at least {MIN_CALIBRATION_IMAGES} images in the {name} set, "
                              f"got {images}: give more images or quantize 'none'", parameter=name)


class PlanQuantization(Analysis):
    """Plan int8 on the float original and time the chosen quantisation alone (see the module
    docstring); provides the plan, usable when its ``config`` is set."""

    name = "plan_quantization"
    provides = (QuantizationPlan,)

    def __init__(self, mode: str = "auto", settings: QuantizeSettings = QuantizeSettings(), train_device: str = "cpu"):
        check_quantize_mode(mode)
        self.mode, self.settings, self.train_device = mode, settings, train_device

    @classmethod
    def from_config(cls, config) -> "PlanQuantization":
        return cls(config.quantize, config.quantization, config.recovery.device)

    def check(self, model: Model, ctx) -> None:
        if self.mode != "none":  # the device is checked below (int8) or by the plan (auto: left off)
            replace(self.settings, device="cpu").check()
        if self.mode == "int8":
            check_int8_run(ctx, self.name)

    def _settings(self, ctx) -> QuantizeSettings:
        return replace(self.settings, device=ctx.latency.device)

    def plan(self, ctx, float_proto: onnx.ModelProto | None = None) -> QuantizationPlan:
        """The plan for ``ctx.original`` (``float_proto``: its ONNX form where the caller has it),
        without the pipeline's timing of it alone (``graphprune profile --quantize`` plans with this
        and times the chosen model itself)."""
        if self.mode == "none":
            return QuantizationPlan(None, None, "quantize is 'none'", "", 0.0, [])
        unavailable = (auto_unavailable(ctx, self.name) or _unwritable(ctx)) if self.mode == "auto" else None
        if unavailable is not None:
            return QuantizationPlan(None, None, f"int8 left off: {unavailable}", "", 0.0, [])
        from ..backends.onnxruntime_int8 import onnxruntime_cut

        tiny = ctx.need("tiny", self.name)
        proto = to_onnx(ctx.original) if float_proto is None else float_proto
        settings = self._settings(ctx)

        def mimic() -> MimicSettings:  # sized to the time left when the mimicking starts
            return settings.mimic_settings(self.train_device, ctx.stage_budget(None, share=MIMIC_SHARE))

        improve = None if settings.mimic == "off" else \
            functools.partial(_mimicked, ctx.original, proto, tiny.images, settings.device, mimic, ctx.feature_node,
                              ctx.show_progress)
        try:
            plan = plan_quantization(proto, tiny.images, tiny.images, settings,
                                     onnxruntime_cut(proto, tiny.images, ctx.latency),
                                     tiny.labels if tiny.has_labels else None, improve,
                                     ctx.stage_budget(None, share=PLAN_SHARE), output_batch_axes(ctx.original))
        except NoCandidate as exc:  # none made or judged (a target it cannot time is refused): float
            if self.mode != "auto":
                raise
            return QuantizationPlan(None, None, f"int8 left off: {exc}", "", 0.0, [])
        return forced_plan(plan, self.settings.time_noise) if self.mode == "int8" and plan.config is None else plan

    def run(self, model: Model, ctx, inputs) -> PassResult:
        plan = self.plan(ctx)
        if plan.config is not None:
            plan = replace(plan, alone=measure_quantization_alone(ctx, plan, self.name))
        record = {"mode": self.mode, "used": plan.config is not None, **plan.to_dict()}
        return PassResult(model, record=record, artifacts=[plan])


def _mimicked(original: Model, float_proto: onnx.ModelProto, images, device: str,
              mimic: Callable[[], MimicSettings], feature_node: str | None, show_progress: bool,
              candidate) -> tuple[onnx.ModelProto, dict] | None:
    """The plan's ``improve``: ``candidate`` made again from weights trained by quantisation-aware
    mimicking as ``mimic()`` says when it starts (None where nothing could be trained, and for
    float16: it has no int8 rounding to learn)."""
    if candidate.config.is_half:
        return None
    trained, record = mimic_trained(original, original, float_proto, images, candidate.config, mimic(), feature_node,
                                    show_progress)
    if record.get("skipped"):
        return None
    return with_mimic_record(quantize_onnx(trained, config=replace(candidate.config, mimic=True), device=device),
                             record), record


def mimic_trained(model: Model, teacher: Model, float_proto: onnx.ModelProto, images, config: QuantConfig,
                  mimic: MimicSettings, feature_node: str | None = None,
                  show_progress: bool = False) -> tuple[Calibrated, dict]:
    """``model`` (``float_proto``: its ONNX form, which the caller already made) trained by
    quantisation-aware mimicking for ``config``'s rounding, as ONNX ready to quantise with the ranges
    it learnt, and the training's record."""
    before = Calibrated(float_proto, images)
    trained, record = mimic_quantized(model, teacher, before, config, mimic, feature_node, show_progress)
    after = Calibrated(to_onnx(trained), images)
    after.take_ranges(before)
    return after, record


def forced_plan(plan: QuantizationPlan, time_noise: float) -> QuantizationPlan:
    """Mode ``"int8"`` where the plan chose none, saying why: the candidate that loses least of those
    measured faster (:func:`~.quantize_plan.closest_candidate`), else (none faster) the fastest."""
    measured = [c for c in plan.candidates if c.error is None and c.timing is not None]
    closest = closest_candidate(measured, time_noise)
    taken = closest or max(measured, key=lambda c: c.timing.cut)
    which = (f"the faster candidate that loses least ({plan.metric} {taken.loss:.3f}, cut {taken.timing.cut:+.1%})"
             if closest else f"the fastest candidate measured (cut {taken.timing.cut:+.1%})")
    reason = f"quantize 'int8': {taken.config.label} used as asked, {which}, although {plan.reason.split('; auto')[0]}"
    return replace(plan, proto=None, config=taken.config, reason=reason)


def usable_plan(inputs) -> QuantizationPlan | None:
    """The plan the run quantises with, or None (no plan step, or a plan that chose float). A pass
    asking must declare ``QuantizationPlan`` (optional): an undeclared type is a KeyError."""
    plan = inputs.get(QuantizationPlan)
    return plan if plan is not None and plan.config is not None else None


@dataclass(frozen=True)
class Measuring:
    """How a pass times models in this run: ``backend`` runs candidates as they will be written (int8
    with the plan's config where a usable plan is present); ``reference``, only then, runs the float
    original that a selection's cut is taken against (None: ``backend`` runs both)."""

    backend: LatencyBackend
    reference: LatencyBackend | None = None
    plan: QuantizationPlan | None = None

    @property
    def quantized(self) -> bool:
        return self.plan is not None

    def cache(self, ctx, kind: str):
        """The resume cache ``kind`` for these measurements (a float run's key is as it always was)."""
        extra = () if self.plan is None else (self.plan.config.to_dict(), TIMING_CALIBRATION_IMAGES,
                                              _images_key(ctx.tiny.images[:TIMING_CALIBRATION_IMAGES]))
        return ctx.cache(kind, (self.reference or self.backend).name, ctx.latency.to_dict(), *extra)


def measuring_backend(ctx, inputs, by: str) -> Measuring:
    """The quantised-measurement rule (module docstring), in one place for every measuring pass."""
    return measuring_with(ctx, usable_plan(inputs), by)


def measuring_with(ctx, plan: QuantizationPlan | None, by: str) -> Measuring:
    """:func:`measuring_backend` for a given plan (float where it is None or chose float)."""
    backend = ctx.need("backend", by)
    if plan is None or plan.config is None:
        return Measuring(backend)
    from ..backends.onnxruntime_int8 import QuantizedOnnxRuntime

    calibration = ctx.need("tiny", by).images[:TIMING_CALIBRATION_IMAGES]
    return Measuring(QuantizedOnnxRuntime(calibration, plan.config, base=backend), backend, plan)


def measure_quantization_alone(ctx, plan: QuantizationPlan, by: str) -> CutMeasurement:
    """The plan's quantisation with no block dropped against the float original, interleaved, on the
    backends selection measures its candidates with (:func:`measuring_with`); read from the resume
    cache of measured block sets where a run measured it before (module docstring)."""
    from .measure_latency import measure_cut  # measure_latency's passes import this module

    measuring = measuring_with(ctx, plan, by)
    cache = measuring.cache(ctx, SELECTION_CACHE)
    if EMPTY_SET not in cache:
        original = ctx.original
        cut = measure_cut(measuring.backend, original, original, ctx.latency,
                          measuring.reference.prepare(original, ctx.latency))
        cache[EMPTY_SET] = cut.to_dict()
    return CutMeasurement.from_dict(cache.get(EMPTY_SET))


def no_block_needed(ctx, inputs) -> str | None:
    """Why a pass may skip its block work: where the usable plan's quantisation alone measures at
    the goal (:func:`~.selection.goal_cut` of the run's target and margin), the reason; else None
    (no plan, a float plan, no target set, or short of the goal: the pass works as without a plan).
    A pass asking must declare ``QuantizationPlan`` (optional)."""
    plan = usable_plan(inputs)
    if plan is None or plan.alone is None or ctx.latency_cut is None:
        return None
    goal = goal_cut(ctx.latency_cut, ctx.margin)
    if plan.alone.cut < goal:
        return None
    return (f"quantisation alone reaches the target: it measures a {plan.alone.cut:.1%} cut, the goal is "
            f"{goal:.1%}; no block is dropped")


def _images_key(images) -> str:
    from ..cache import tensor_fingerprint

    return tensor_fingerprint(images)
