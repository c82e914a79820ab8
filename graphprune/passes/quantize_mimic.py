"""Quantisation-aware mimicking: train the float weights so that the int8 model onnxruntime makes
from them stays close to the float original.

**Where int8 loses.** onnxruntime's static quantisation rounds every quantised activation tensor
``x`` to ``q = clamp(round(x / s) + z, lo, hi)`` and reads ``x^ = (q - z) * s`` back (one scale
``s`` and zero point ``z`` per tensor, from the calibration ranges). On nudenet's YOLOv8n
(benchmarks/studies/int8_mimic.py, 200 tiny photos, 800 unseen) the activations carry the loss,
not the weights: per-channel int8 weights alone keep mAP50 against the float model at 0.99 on the
unseen photos; int8 activations with float weights score 0.91, both together 0.90. Leaving
operators in float does not help (the error is spread over the network: leaving any one conv in
float moves the score by noise, every SiLU's Mul and Sigmoid 0.92), so the weights must learn to
live with the rounding.

**The training.** The same rounding, ``torch.fake_quantize_per_tensor_affine`` with the quantised
graph's own ``s``, ``z``, ``lo``, ``hi``, is inserted into a copy of the fx graph after every
tensor the quantised graph quantises (:func:`fake_quant_points`, mapped to fx nodes by ONNX tensor
name: :func:`tensor_nodes`). Its gradient is the straight-through one (1 inside ``[lo, hi]``, 0
outside), so the weights see the rounding's effect. The student minimises the recovery's feature
mimicking loss (:func:`graphprune.features.mimic_loss`, the same targets) against the float
original on the tiny set, AdamW, cosine schedule. The weights are rounded too, per channel, with
the scale onnxruntime will compute from them as they train (:class:`RoundedWeight`, a
parametrization removed afterwards), so the graph trained is the int8 model's. The trained float
weights are quantised afresh with the calibration ranges they were trained for
(:meth:`~.quantize.Calibrated.take_ranges`), so the written file is a plain int8 ONNX.

Measured (``python -m benchmarks.studies.int8_mimic``: YOLOv8n, qdq-u8s8 with Add/Concat and the
decoding in float, batches of 16 at lr 1e-5, bf16 on this 2-core EPYC; mAP50 against the float model
on the 200 tiny photos trained on / the 800 unseen): post-training 0.838 / 0.901; 100 steps (2.0
minutes) 0.937 / 0.947; 200 steps (4.0 minutes) 0.954 / 0.956, the default. With ranges calibrated
anew after training instead of the ones it trained for: 0.927 / 0.939 and 0.961 / 0.942.
"""

from __future__ import annotations

import copy
import json
import math
import operator
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from ..errors import GraphpruneError
from ..features import mimic_loss, mimic_targets, run_batched, target_names, target_weights, truncate
from ..formats.io_onnx import onnx_index
from ..memory import training_batch
from ..model import Model
from ..precision import autocast, check_precision
from ..progress import progress_bar
from .calibration import Calibrated
from .quantize import INFO_KEY, QuantConfig, quantization_info, quantize_onnx


TIMED_STEPS = 3  # steps timed before a time limit sizes the schedule


@dataclass(frozen=True)
class MimicSettings:
    """How long and how fast quantisation-aware mimicking trains (defaults: the measurement in the
    module docstring)."""

    steps: int = 200
    lr: float = 1e-5
    batch_size: int = 16
    precision: str = "auto"
    seed: int = 0
    device: str = "cpu"
    # the schedule shortened to the steps that fit, timed on the first TIMED_STEPS (a run's --time-budget)
    max_seconds: float | None = None

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise GraphpruneError("mimic steps and batch size must be at least 1 and its lr positive",
                                  parameter="mimic_steps")
        check_precision(self.precision, "mimic_precision")


@dataclass(frozen=True)
class FakeQuant:
    """One quantised activation: scale, zero point and the integer range of its type."""

    scale: float
    zero_point: int
    low: int
    high: int


# onnxruntime's names: a quantised graph output X is computed as X + OUTPUT_SUFFIX (then rounded
# back to X); a quantised weight W is stored as W + WEIGHT_SUFFIX
OUTPUT_SUFFIX, WEIGHT_SUFFIX = "_QuantizeLinear_Input", "_quantized"


def fake_quant_points(quantized: onnx.ModelProto) -> dict[str, FakeQuant]:
    """ONNX tensor name (of the float graph) -> its rounding, for every activation (not
    initializer) tensor that a ``QuantizeLinear`` of ``quantized`` reads with a per-tensor scale."""
    inits = {t.name: t for t in quantized.graph.initializer}
    points = {}
    for node in quantized.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        if node.input[1] not in inits or node.input[2] not in inits:
            continue
        scale, zero = numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]])
        if scale.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        points[node.input[0].removesuffix(OUTPUT_SUFFIX)] = FakeQuant(
            float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), int(info.min), int(info.max))
    return points


def weight_rounding(quantized: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Float initializer name -> (channel axis, integer steps per side) for every weight that
    ``quantized`` stores per-channel symmetric (zero point 0): onnxruntime's scale for channel c is
    max|w_c| / steps (127, or 63-64 with 7-bit weights), read here as the largest stored integer."""
    inits = {t.name: t for t in quantized.graph.initializer}
    found = {}
    for node in quantized.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or not node.input[0].endswith(WEIGHT_SUFFIX):
            continue
        stored = numpy_helper.to_array(inits[node.input[0]])
        zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else 0
        if stored.dtype != np.int8 or np.any(zero != 0) or stored.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        found[node.input[0].removesuffix(WEIGHT_SUFFIX)] = (axis % stored.ndim, int(np.abs(stored.astype(np.int32)).max()))
    return found


class RoundedWeight(torch.nn.Module):
    """A parametrization: the weight rounded per channel as onnxruntime will round it, its scale
    following the weight as it trains (straight-through gradient)."""

    def __init__(self, axis: int, steps: int):
        super().__init__()
        self.axis, self.steps = axis, max(steps, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        others = [d for d in range(weight.dim()) if d != self.axis]
        scale = (weight.detach().abs().amax(dim=others).float() / self.steps).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, self.axis, -self.steps,
                                                      self.steps).to(weight.dtype)


def round_weights(model: Model, gm: fx.GraphModule, rounding: dict[str, tuple[int, int]]) -> list[tuple[torch.nn.Module, str]]:
    """Parametrize ``gm``'s weights (those of ``model``'s ONNX initializers, stored as they are)
    with :class:`RoundedWeight`; the (module, attribute) pairs, for :func:`unround_weights`."""
    from torch.nn.utils import parametrize

    links = model.onnx.weight_links if model.onnx is not None else {}
    done = []
    for target, link in links.items():
        if link.initializer not in rounding or link.transform != "same":
            continue
        module_name, _, attribute = target.rpartition(".")
        module = gm.get_submodule(module_name)
        parametrize.register_parametrization(module, attribute, RoundedWeight(*rounding[link.initializer]))
        done.append((module, attribute))
    return done


def unround_weights(rounded: list[tuple[torch.nn.Module, str]]) -> None:
    """The trained float weights back in place of their parametrizations."""
    from torch.nn.utils import parametrize

    for module, attribute in rounded:
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)


def tensor_nodes(gm: fx.GraphModule, input_names: list[str]) -> dict[str, fx.Node]:
    """ONNX tensor name -> the fx node computing it, for a graph converted from ONNX (module ``n<i>``
    is ONNX node ``i``; a node of several outputs is read through ``getitem``); graph inputs by order."""
    nodes = {}
    for node in gm.graph.nodes:
        if onnx_index(node) is None:
            continue
        outputs = [name for name in gm.get_submodule(node.target).onnx_mapping.outputs]
        if len(outputs) == 1:
            nodes[outputs[0]] = node
            continue
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                nodes[outputs[user.args[1]]] = user
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], input_names):
        nodes[name] = node
    return nodes


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, low: int, high: int) -> torch.Tensor:
    """``x`` rounded as onnxruntime rounds it (in float32, whatever autocast made it)."""
    if not x.is_floating_point():
        return x
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, low, high).to(x.dtype)


def with_fake_quant(gm: fx.GraphModule, points: dict[str, FakeQuant], nodes: dict[str, fx.Node]) -> tuple[fx.GraphModule, int]:
    """A GraphModule sharing ``gm``'s weights with :func:`fake_quantize` after every node of
    ``nodes`` that ``points`` names, and how many it inserted."""
    graph = copy.deepcopy(gm.graph)
    copies = {n.name: n for n in graph.nodes}
    rounded = {name: point for name, point in points.items() if name in nodes}
    for name, point in rounded.items():
        node = copies[nodes[name].name]
        with graph.inserting_after(node):
            quant = graph.call_function(fake_quantize, (node, point.scale, point.zero_point, point.low, point.high))
        node.replace_all_uses_with(quant, delete_user_cb=lambda user, q=quant: user is not q)
    return fx.GraphModule(gm, graph), len(rounded)


def mimic_quantized(model: Model, teacher: Model, calibrated: Calibrated, config: QuantConfig,
                    settings: MimicSettings = MimicSettings(), feature_node: str | None = None,
                    show_progress: bool = False) -> tuple[Model, dict]:
    """A copy of ``model`` whose float weights were trained with ``config``'s rounding in the graph
    to mimic ``teacher``'s targets on the images of ``calibrated`` (``model``'s ONNX form, ready to
    quantise: the rounding is read from its QDQ form, the operator form hiding its scales inside
    fused operators, both rounding alike), and a record. Quantise the copy with
    ``calibrated``'s ranges (:meth:`~.quantize.Calibrated.take_ranges`): the weights learnt those.
    ``model`` must come from ONNX (its tensors are matched to the quantised graph's by name); where
    none matches, the copy is untrained and the record's ``skipped`` says why."""
    settings.check()
    images = calibrated.images
    quantized = quantize_onnx(calibrated, config=replace(config, fmt="qdq", mimic=False))
    student_model = model.clone()
    # PicoDet at 800 x 608: 16 images ran out of memory; each activation is kept with its rounding
    batch_size = training_batch(student_model, settings.batch_size, copies=2)
    gm = student_model.graph_module.to(settings.device).eval()
    points = fake_quant_points(quantized)
    rounded, inserted = with_fake_quant(gm, points, tensor_nodes(gm, [spec.name for spec in model.inputs]))
    record = {"steps": 0, "quantised_tensors": len(points), "rounded_in_training": inserted,
              "settings": {"steps": settings.steps, "lr": settings.lr, "batch_size": batch_size}}
    if not inserted:
        record["skipped"] = "no tensor of the quantised graph maps to the model's graph (not converted from ONNX)"
        return student_model, record
    weights_rounded = round_weights(student_model, gm, weight_rounding(quantized))
    record["weights_rounded_in_training"] = len(weights_rounded)
    targets = mimic_targets(teacher, feature_node)
    teacher_gm = truncate(teacher.clone().graph_module.to(settings.device).eval(), target_names(teacher.graph_module, targets))
    student = truncate(rounded, target_names(rounded, targets))
    with torch.no_grad():
        wanted = [t.float() for t in _as_tuple(run_batched(teacher_gm, images.to(settings.device), settings.batch_size))]
    weights = target_weights(wanted)  # one target: 1
    params = [p for p in student.parameters() if p.is_floating_point()]
    if not params:
        raise GraphpruneError("quantisation-aware mimicking has nothing to train: no weights before the mimicked tensors")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    start, curve, total = time.perf_counter(), [], settings.steps
    bar = progress_bar(total=total, desc="int8 mimicking", enabled=show_progress)
    while len(curve) < total:
        for group in optimizer.param_groups:  # cosine from lr to 0 over the (possibly shortened) schedule
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * len(curve) / total))
        pick = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        with autocast(settings.precision, settings.device):
            out = _as_tuple(student(images[pick].to(settings.device)))
        loss = mimic_loss([o.float() for o in out], [w[pick] for w in wanted], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(float(loss.detach()))
        bar.update()
        if len(curve) >= TIMED_STEPS and settings.max_seconds is not None:
            # sized on the first steps and again after each one: a pace that drops (a CPU shared
            # with other work) overran the limit by a third where the schedule was sized once
            fit = int(settings.max_seconds / ((time.perf_counter() - start) / len(curve)))
            if fit < total:
                total = max(fit, len(curve))  # len(curve) >= TIMED_STEPS here
                record["shortened_to_fit_seconds"] = settings.max_seconds
    bar.close()
    for p in params:
        p.requires_grad_(False)
    unround_weights(weights_rounded)
    window = max(1, len(curve) // 10)
    record.update(steps=len(curve), seconds=round(time.perf_counter() - start, 1),
                  loss_first=float(np.mean(curve[:window])), loss_last=float(np.mean(curve[-window:])))
    return student_model.with_graph_module(gm.cpu()), record


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def with_mimic_record(proto: onnx.ModelProto, record: dict) -> onnx.ModelProto:
    """``proto`` with how quantisation-aware mimicking trained its weights added to its
    :func:`quantization_info` (``"mimic"``): what the report and a later reader of the file see."""
    info = {**quantization_info(proto), "mimic": record}
    for prop in list(proto.metadata_props):
        if prop.key == INFO_KEY:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=INFO_KEY, value=json.dumps(info))
    return proto
