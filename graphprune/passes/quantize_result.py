"""``quantize_result``: the model written when the run quantises.

:class:`QuantizeResult` (analysis -> :class:`QuantizedOnnx`) quantises the recovered model
(``to_onnx``) with the plan's config (:mod:`.plan_quantization`), calibrated on *all* of
``ctx.tiny``: the model written. A config the plan chose after quantisation-aware mimicking
(``+mimic``: no plain candidate was within the bound) has the recovered model's weights trained the
same way first (:func:`quantize_model`), unless no block was dropped: the plan's own int8 model is
written then. The fx model stays float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..formats.model_io import to_onnx
from ..formats.batch_axis import output_batch_axes
from ..formats.ort_run import cpu_session, run_outputs
from ..model import Model
from .base import Analysis, PassResult
from .plan_quantization import mimic_trained
from .quantize import QuantConfig, QuantizeSettings, quantization_info, quantize_onnx
from .quantize_mimic import MimicSettings, with_mimic_record
from .quantize_plan import QuantizationPlan

# With a --time-budget: quantize_result's mimicking leaves this many seconds for the steps after it
# (a guard, not a knee)
MIMIC_RESERVE_SECONDS = 60.0


@dataclass(frozen=True)
class QuantizedOnnx:
    """Artefact: the model as written when quantised (``proto``; None when the plan chose float,
    with the ``reason``), how it was made (``info``: :func:`~.quantize.quantization_info`) and how
    close it stays to the float model it was made from on the tiny set."""

    proto: onnx.ModelProto | None
    info: dict = field(default_factory=dict)
    reason: str = ""
    agreement: dict = field(default_factory=dict)

    @property
    def float_nodes(self) -> list[str]:
        return list(self.info.get("float_nodes", []))


class QuantizeResult(Analysis):
    """Quantise the current (recovered) model with the plan's config, calibrated on every image of
    ``ctx.tiny``, its weights first trained by quantisation-aware mimicking where the config says
    so; the fx model stays float (the written file is the ``QuantizedOnnx``)."""

    name = "quantize_result"
    requires = (QuantizationPlan,)
    provides = (QuantizedOnnx,)
    batch_size = 64

    def __init__(self, settings: QuantizeSettings = QuantizeSettings(), train_device: str = "cpu"):
        self.settings, self.train_device = settings, train_device

    @classmethod
    def from_config(cls, config) -> "QuantizeResult":
        return cls(config.quantization, config.recovery.device)

    # no check of its own: a plan with a config exists only where plan_quantization found int8 can run

    def run(self, model: Model, ctx, inputs) -> PassResult:
        plan = inputs[QuantizationPlan]
        if plan.config is None:
            quantized = QuantizedOnnx(None, reason=f"not quantised: {plan.reason}")
            return PassResult(model, record={"quantized": False, "reason": quantized.reason}, artifacts=[quantized])
        images = ctx.need("tiny", self.name).images
        if plan.config.mimic and plan.proto is not None and model.graph_module is ctx.original.graph_module:
            # the plan trained this very model on these images (seeded): training again repeats its
            # minutes to the same weights
            quantized = QuantizedOnnx(plan.proto, quantization_info(plan.proto), plan.reason,
                                      output_agreement(to_onnx(model), plan.proto, images, self.batch_size,
                                                       output_batch_axes(model)))
        else:
            mimic = self.settings.mimic_settings(self.train_device, ctx.stage_budget(None, reserve=MIMIC_RESERVE_SECONDS))
            quantized = quantize_model(model, mimic_teacher(model, ctx.original), images, plan.config,
                                       ctx.latency.device, plan.reason, mimic, ctx.feature_node, self.batch_size,
                                       ctx.show_progress)
        record = {"quantized": True, "config": plan.config.to_dict(), "float_nodes": quantized.float_nodes,
                  "calibration_images": len(images), "opset": quantized.info.get("opset"),
                  "notes": quantized.info.get("notes"), "mimic": quantized.info.get("mimic"),
                  "against_float_on_tiny_set": quantized.agreement}
        return PassResult(model, record=record, artifacts=[quantized])


def mimic_teacher(model: Model, original: Model) -> Model:
    """Whom quantisation-aware mimicking copies: the original, whose features a model with blocks
    dropped still has in its shapes; the float model itself where it runs behind a resize (the
    resolution lever), whose feature maps and a detector's anchors are smaller than the original's
    (nudenet's YOLOv8n at 256 px: 32 x 32 maps against 40 x 40), so int8 keeps what the resize
    kept and nothing is trained for the resize, as that lever says."""
    return model if model.meta.get("resized_input") is not None else original


def quantize_model(model: Model, teacher: Model, images, config: QuantConfig, device: str = "cpu", reason: str = "",
                   mimic: MimicSettings = MimicSettings(), feature_node: str | None = None, batch_size: int = 64,
                   show_progress: bool = False) -> QuantizedOnnx:
    """``model`` quantised with ``config``, calibrated on every one of ``images``, with how it was
    made and how close it stays to the float model on those images (what ``quantize_result``
    writes, and what ``graphprune profile --quantize`` times). Where ``config.mimic``, the weights
    are first trained to mimic ``teacher`` with the plain quantisation's rounding in the graph
    (:mod:`.quantize_mimic`, as ``mimic`` says); ``info["mimic"]`` is that training's record."""
    float_proto = to_onnx(model)
    if config.mimic:
        trained, record = mimic_trained(model, teacher, float_proto, images, config, mimic, feature_node, show_progress)
        proto = with_mimic_record(quantize_onnx(trained, config=config, device=device), record)
    else:
        proto = quantize_onnx(float_proto, images, config, device)
    return QuantizedOnnx(proto, quantization_info(proto), reason,
                         output_agreement(float_proto, proto, images, batch_size, output_batch_axes(model)))


def output_agreement(float_proto: onnx.ModelProto, proto: onnx.ModelProto, images, batch_size: int = 64,
                     axes: tuple[int, ...] = ()) -> dict:
    """The quantised model against the float one on ``images``: the output's relative error and,
    for a classifier output (N, K), the fraction of images whose top-1 class is the same
    (``axes``: where the outputs hold their batch, ``batch_axis.output_batch_axes``)."""
    reference = run_outputs(cpu_session(float_proto, "the float model"), images, batch_size, axes)
    out = run_outputs(cpu_session(proto), images, batch_size, axes)
    result = {"images": int(len(out)),
              "relative_error": float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-12))}
    if reference.ndim == 2 and reference.shape[1] > 1:
        result["top1_agreement"] = float((out.argmax(1) == reference.argmax(1)).mean())
    return result
