"""Timing int8 models on onnxruntime, so that choices are made on the models as they will run.

* :func:`onnxruntime_cut`: the ``measure`` callable :func:`graphprune.passes.quantize_plan.plan_quantization`
  takes: each quantised candidate timed interleaved with the float model (A B A B), its cut
  ``1 - candidate / float`` from that one run (as :mod:`graphprune.passes.measure_latency` does for
  blocks), with the same session options as :class:`~graphprune.backends.onnxruntime.OnnxRuntimeBackend`.
* :class:`QuantizedOnnxRuntime`: a :class:`~graphprune.backends.base.LatencyBackend` that times every
  model *quantised with a fixed plan* (format, types, float groups), for block selection on an int8
  target (float16 on a GPU target). Float groups are roles, re-derived in each model (a dropped block's nodes are gone; the
  first conv and the classifier are found again), never node names.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ..formats.input_layout import is_channels_last, looks_channels_last
from ..formats.model_io import to_onnx
from ..model import Model
from ..passes.calibration import as_images
from ..passes.quantize import HALF, QuantConfig, quantize_onnx
from ..passes.quantize_plan import Timing
from .base import LatencySettings, RunOnce, compare_interleaved, latency_cut
from .environment import batch_inputs, check_settings
from .onnxruntime import OnnxRuntimeBackend, session_runner


def onnxruntime_cut(reference: onnx.ModelProto, images, settings: LatencySettings = LatencySettings()):
    """``measure(candidate) -> Timing``: ``candidate`` and ``reference`` timed interleaved on the
    first ``settings.batch_size`` of ``images`` (N, C, H, W; fed in the file's own layout)."""
    check_settings(settings)
    batch = (torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
             .float()[:settings.batch_size],)
    channels_last = _file_channels_last(reference)
    reference_run = session_runner(reference, batch, settings, channels_last, "the float model")

    def measure(candidate: onnx.ModelProto) -> Timing:
        run = session_runner(candidate, batch, settings, channels_last, "the quantised model")
        ref, cand = compare_interleaved([reference_run, run], settings)
        return Timing(latency_cut(ref, cand), ref.median_ms, cand.median_ms)

    return measure


def _file_channels_last(proto: onnx.ModelProto) -> bool:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return looks_channels_last(tuple(d.dim_value if d.HasField("dim_value") else None for d in dims))


class QuantizedOnnxRuntime:
    """Time each model as ``config`` quantises it (calibrated on ``calibration`` each time; a
    float16 config, for a GPU target, converts it instead)."""

    def __init__(self, calibration, config: QuantConfig = QuantConfig(), base: OnnxRuntimeBackend | None = None):
        self.calibration = as_images(calibration)
        self.config = config
        self.base = base or OnnxRuntimeBackend()

    @property
    def name(self) -> str:
        return f"onnxruntime-{HALF if self.config.is_half else 'int8'}"

    def prepare(self, model: Model, settings: LatencySettings) -> RunOnce:
        check_settings(settings)
        quantized = quantize_onnx(to_onnx(model, verify=False), self.calibration, self.config, settings.device)
        return session_runner(quantized, batch_inputs(model, settings), settings, is_channels_last(model),
                              "the quantised model")

    def describe(self, settings: LatencySettings) -> dict:
        info = self.base.describe(settings)
        info["backend"] = self.name
        info["quantization"] = {**self.config.to_dict(), "calibration_images": len(self.calibration)}
        return info
