"""Static int8 quantisation with onnxruntime, chosen by measurement: the core a pass wraps.

* :func:`quantize_onnx`: one static quantisation (``onnxruntime.quantization.quantize_static``)
  of an ONNX graph, calibrated on every given image (batched, fed in the file's own input layout
  and dtype), ``quant_pre_process`` first where it works, per-channel int8 weights. The result is
  loaded by onnxruntime before it is returned, and says in its metadata how it was made
  (:func:`quantization_info`).
* :func:`graphprune.passes.quantize_plan.plan_quantization` chooses among quantisations by
  measurement (split out: this module is the mechanism, that one the policy).
* Half precision for GPU targets (int8 on onnxruntime's CUDA provider gains little without
  TensorRT): the config ``fp16`` (:data:`HALF`), the one candidate :meth:`QuantizeSettings.candidates`
  gives for a CUDA device; :func:`quantize_onnx` makes it with :func:`graphprune.passes.float16.to_float16`
  (no calibration), its float groups kept in float32, so the plan measures and judges it as it does int8.

Evidence (issue 28; AMD EPYC with avx512_vnni, onnxruntime CPU, 1 thread, batch 1): QDQ with uint8
activations / int8 per-channel weights cut CIFAR ResNet-56 by 54.7% (top-1 92.6 -> 92.8) and
EfficientNet-Lite0 by 49.3%; QOperator the same; int8 *activations* made ResNet-56 41% slower. So
both formats and both activation types are candidates and the measurement decides.

Opsets: per-channel ``DequantizeLinear`` (its ``axis``) needs opset 13, so a QDQ per-channel
quantisation of an older graph (PP-OCRv4's detector is opset 12) converts it to 13 first and says
so; QOperator (``QLinearConv`` takes per-channel scales since opset 10) and per-tensor QDQ keep the
input's opset.

Float groups (``nodes_to_exclude``) are *roles* (``first_conv``, ``classifier``, ``add_concat``, ``decode``),
resolved to node names in each graph as it is quantised (:mod:`graphprune.passes.float_groups`), so
they survive block dropping.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx

from ..errors import GraphpruneError, first_line
from ..formats.onnx_opset import default_opset
from ..formats.ort_run import cpu_session
from .calibration import METHOD_NAMES, MIN_CALIBRATION_IMAGES, Calibrated, quiet
from .float_groups import FLOAT_GROUPS, float_group_nodes

FORMATS = ("qdq", "qoperator")
TYPES = ("uint8", "int8")
METHODS = ("minmax", "entropy", "percentile")
MIMIC_MODES = ("auto", "off")
HALF = "fp16"  # QuantConfig.fmt of float16 weights and compute (GPU targets)
PER_CHANNEL_QDQ_OPSET = 13  # DequantizeLinear's axis attribute (per-channel weights) is opset 13+
INFO_KEY = "graphprune.quantization"
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class QuantConfig:
    """One quantisation: format, activation/weight types, calibration and the groups left in float."""

    fmt: str = "qdq"
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    method: str = "minmax"
    float_groups: tuple[str, ...] = ()
    reduce_range: bool | None = None  # 7-bit weights; None: where 8-bit ones saturate (saturating_cpu)
    # The float weights are first trained with this config's activation rounding in the graph
    # (quantize_mimic.py). A pass does that (quantize_result); quantize_onnx quantises the weights it
    # is given, so the timing of a config is the same with or without it.
    mimic: bool = False

    @classmethod
    def half(cls, float_groups: tuple[str, ...] = ()) -> "QuantConfig":
        """Float16 weights and compute, ``float_groups`` left in float32 (GPU targets)."""
        return cls(HALF, "float16", "float16", per_channel=False, method="none", float_groups=tuple(float_groups))

    @property
    def is_half(self) -> bool:
        return self.fmt == HALF

    @property
    def label(self) -> str:
        extra = "".join(f"+float:{g}" for g in self.float_groups) + ("+mimic" if self.mimic else "")
        if self.is_half:
            return f"{HALF}{extra}"
        short = {"uint8": "u8", "int8": "s8"}
        return f"{self.fmt}-{short[self.activations]}{short[self.weights]}{'-7bit' if self.reduce_range else ''}{extra}"

    def to_dict(self) -> dict:
        return {**asdict(self), "float_groups": list(self.float_groups), "label": self.label}

    @classmethod
    def from_label(cls, label: str) -> "QuantConfig":
        """The config a :attr:`label` names (``qdq-u8s8``, ``qoperator-s8s8-7bit+float:first_conv``),
        per-channel MinMax as a plan's candidates are; without ``-7bit`` the CPU decides
        (``reduce_range=None``), as it does for the candidates."""
        types = {"u8": "uint8", "s8": "int8"}
        label = label.strip()
        mimic = label.endswith("+mimic")
        base, *groups = label.removesuffix("+mimic").split("+float:")
        if base == HALF and not mimic and all(g in FLOAT_GROUPS for g in groups):
            return cls.half(tuple(groups))
        fmt, _, rest = base.partition("-")
        kinds, _, seven = rest.partition("-")
        if (fmt not in FORMATS or kinds[:2] not in types or kinds[2:] not in types or seven not in ("", "7bit")
                or any(g not in FLOAT_GROUPS for g in groups)):
            raise GraphpruneError(f"label '{label}' names no quantisation config: write it like qdq-u8s8 or "
                                  f"qoperator-s8s8-7bit+float:first_conv+mimic (format {' or '.join(FORMATS)}; u8 or "
                                  f"s8 activations, then weights; float groups {', '.join(FLOAT_GROUPS)}; +mimic "
                                  f"last), or {HALF}+float:decode (float16)", parameter="label")
        return cls(fmt, types[kinds[:2]], types[kinds[2:]], float_groups=tuple(groups),
                   reduce_range=True if seven else None, mimic=mimic)


@dataclass(frozen=True)
class QuantizeSettings:
    """What :func:`plan_quantization` tries and how it judges.

    Accuracy bound, by what the judged images allow: ``max_top1_drop`` with labels; otherwise, for
    a classifier output (N, K), ``max_disagreement`` (top-1 changes against the float model, an
    upper bound on the accuracy it can lose); for a YOLOv8 detector output (N, 4+C, anchors) or a
    YOLOv5-style one (N, anchors, 5+C) where
    the float model detects something on the judged images, ``max_map50_drop``: 1 - the lower
    of the int8 model's mAP@0.5 with the float model's confident detections as the ground truth
    and the reverse (:mod:`graphprune.fidelity`; detections lost and new, threshold-free: on
    nudenet's YOLOv8n, int8 with its Add/Concat merges and decoding in float ranks the float
    model's detections at mAP50 0.98 and 0.97 the other way on 40 held-out photos, yet scores near
    the 0.25 threshold cross it, so a bound on detections kept at that threshold, 29 of 31 and 2
    new, refused it; benchmarks/studies/int8_detector.py); for a map of values in [0, 1] (N, C, H, W:
    segmentation, a text detector's text map) where the float model marks some region,
    ``max_map_iou_drop``: 1 - the IoU of the regions with the thresholds integrated out
    (:class:`graphprune.fidelity.MapOverlap`); otherwise ``max_relative_error``.
    ``max_calibration_images`` caps the images calibrated on and those judged on (each a seeded sample).
    ``time_noise``: cut differences below this are noise; ``error_noise``: relative-error
    improvements below this fraction are noise (agreement uses a paired sign test instead)."""

    formats: tuple[str, ...] = FORMATS
    activation_types: tuple[str, ...] = TYPES
    weight_type: str = "int8"
    per_channel: bool = True
    calibration_method: str = "minmax"
    max_calibration_images: int = 500
    batch_size: int = 32
    max_top1_drop: float = 0.01
    max_disagreement: float = 0.03
    max_relative_error: float = 0.1
    max_map50_drop: float = 0.05
    max_map_iou_drop: float = 0.05
    float_groups: tuple[str, ...] = FLOAT_GROUPS
    time_noise: float = 0.02
    error_noise: float = 0.1
    seed: int = 0
    device: str = "cpu"
    reduce_range: bool | None = None  # None: on a CPU where 8-bit weights saturate (saturating_cpu)
    # "auto": where no candidate stays within the bound, the closest is trained by quantisation-aware
    # mimicking (quantize_mimic.py, mimic_steps at mimic_lr) and judged again; "off": never
    mimic: str = "auto"
    mimic_steps: int = 200
    mimic_lr: float = 1e-5

    def check(self) -> None:
        for name, values, allowed in (("formats", self.formats, FORMATS), ("activation_types", self.activation_types, TYPES),
                                      ("weight_type", (self.weight_type,), TYPES),
                                      ("calibration_method", (self.calibration_method,), METHODS),
                                      ("float_groups", self.float_groups, FLOAT_GROUPS)):
            bad = [v for v in values if v not in allowed]
            if bad or (not values and name in ("formats", "activation_types")):
                raise GraphpruneError(f"{name} must be chosen from {', '.join(allowed)}, got {', '.join(bad) or 'none'}",
                                      parameter=name)
        if self.max_calibration_images < MIN_CALIBRATION_IMAGES or self.batch_size < 1:
            raise GraphpruneError(f"max_calibration_images must be at least {MIN_CALIBRATION_IMAGES} and batch_size "
                                  "at least 1", parameter="max_calibration_images")
        if self.mimic not in MIMIC_MODES:
            raise GraphpruneError(f"mimic must be one of {', '.join(MIMIC_MODES)}, got '{self.mimic}'", parameter="mimic")
        self.mimic_settings().check()

    def mimic_settings(self, device: str = "cpu", max_seconds: float | None = None):
        """How quantisation-aware mimicking trains (on ``device``, in at most ``max_seconds``)."""
        from .quantize_mimic import MimicSettings

        return MimicSettings(steps=self.mimic_steps, lr=self.mimic_lr, seed=self.seed, device=device,
                             max_seconds=max_seconds)

    def candidates(self) -> list[QuantConfig]:
        """The int8 configs of ``formats`` x ``activation_types`` on a CPU; on a CUDA device float16
        alone (:func:`check_int8_device`: int8 gains little there)."""
        if is_cuda(self.device):
            return [QuantConfig.half()]
        reduce = saturating_cpu() if self.reduce_range is None else self.reduce_range
        return [QuantConfig(fmt, act, self.weight_type, self.per_channel, self.calibration_method, (), reduce)
                for fmt in self.formats for act in self.activation_types]


def saturating_cpu() -> bool:
    """An x86 CPU without VNNI, where onnxruntime's uint8 x int8 kernels add pairs of products in
    16 bits with saturation: 7-bit weights (``reduce_range``) avoid it. Measured on such an AMD
    EPYC (AVX2, no VNNI): a small convnet's output error 13.5% without, 1.6% with (0.9% in
    onnxruntime's unoptimised QDQ reference)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False  # not Linux: cannot tell; reduce_range=True when needed
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def is_cuda(device: str) -> bool:
    return device.startswith("cuda") or "CUDA" in device


def check_int8_device(device: str) -> None:
    """int8 is a CPU optimisation here: refuse it, in one line, for CUDA."""
    if is_cuda(device):
        raise GraphpruneError(
            f"int8 quantisation for device '{device}': onnxruntime's CUDA provider gains little from int8 "
            "without TensorRT; for GPU targets quantize 'auto' plans fp16 (float16) instead", parameter="device")


def is_quantized(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` holds quantised operators (QDQ pairs, QOperator or integer ops), which
    onnxruntime runs and graphprune's converter cannot read."""
    return any(n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")
               or (n.domain == "com.microsoft" and n.op_type.startswith("Q")) for n in proto.graph.node)


def quantization_info(proto: onnx.ModelProto) -> dict:
    """How :func:`quantize_onnx` made ``proto`` (config, opsets, float nodes, notes); {} if it did not."""
    for prop in proto.metadata_props:
        if prop.key == INFO_KEY:
            return json.loads(prop.value)
    return {}


def quantize_onnx(proto: onnx.ModelProto | Calibrated, calibration=None, config: QuantConfig = QuantConfig(),
                  device: str = "cpu") -> onnx.ModelProto:
    """``proto`` statically quantised with ``config``, calibrated on all of ``calibration``
    ((N, C, H, W) float, normalised as the model expects; at least 16 images). Pass a
    :class:`Calibrated` instead to reuse one calibration across quantisations (``calibration``
    is then ignored). Never returns a model onnxruntime refuses to load. A :meth:`QuantConfig.half`
    config gives the float16 model (:func:`graphprune.passes.float16.to_float16`; nothing is calibrated)."""
    if config.is_half:
        from .float16 import to_float16  # float16.py builds on this module's config

        return to_float16(proto.source if isinstance(proto, Calibrated) else proto, config.float_groups)
    check_int8_device(device)
    if config.reduce_range is None:
        config = replace(config, reduce_range=saturating_cpu())
    prepared = proto if isinstance(proto, Calibrated) else Calibrated(proto, calibration)
    opset = prepared.opset
    if config.per_channel and config.fmt == "qdq" and opset < PER_CHANNEL_QDQ_OPSET:
        opset = PER_CHANNEL_QDQ_OPSET
    opsets = [opset] + ([PER_CHANNEL_QDQ_OPSET] if config.per_channel and opset < PER_CHANNEL_QDQ_OPSET else [])
    for attempt in opsets:  # at 13 too when an op's per-channel form is newer than the file
        try:
            return _quantize(prepared, config, attempt)
        except _Refused as exc:
            refused = exc
    raise GraphpruneError(f"onnxruntime refuses the quantised model: {refused}")


class _Refused(Exception):
    """The quantised model does not load in onnxruntime."""


def _quantize(prepared: Calibrated, config: QuantConfig, opset: int) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph, notes = prepared.graph(opset)
    excluded = [name for group in config.float_groups for name in float_group_nodes(graph, group)]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    out = Path(prepared._dir.name) / "quantized.onnx"
    with quiet():
        try:
            ranges = prepared.ranges_file(opset, config.method)  # computed once per graph, opset and method
            quantize_static(prepared.path(opset), str(out), None,
                            quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[config.fmt],
                            per_channel=config.per_channel, activation_type=types[config.activations],
                            weight_type=types[config.weights], nodes_to_exclude=excluded, reduce_range=config.reduce_range,
                            calibrate_method=getattr(CalibrationMethod, METHOD_NAMES[config.method]),
                            calibration_cache_path=ranges)
            quantized = onnx.load(str(out))
        except Exception as exc:  # GraphpruneError too: the calibration session failed
            raise GraphpruneError(f"onnxruntime cannot quantise the model{_culprit(graph, exc)}: {first_line(exc)}") from None
    try:
        cpu_session(quantized)
    except GraphpruneError as exc:
        raise _Refused(str(exc).split(": ", 1)[-1]) from None
    if opset > prepared.opset and config.per_channel:
        notes = [*notes, f"output stays at opset {opset}: per-channel {config.fmt} weights need it"]
    info = {"config": config.to_dict(), "input_opset": prepared.opset, "opset": default_opset(quantized),
            "float_nodes": excluded, "calibration_images": prepared.used.get(config.method, len(prepared.images)),
            "notes": notes}
    quantized.metadata_props.add(key=INFO_KEY, value=json.dumps(info))
    return quantized


def _culprit(graph: onnx.ModelProto, exc: BaseException) -> str:
    """' (node NAME, OP)' for the first node the error names by name or op type, else ''."""
    text = str(exc)
    for node in graph.graph.node:
        if (node.name and node.name in text) or f"{node.op_type}(" in text or f":{node.op_type}" in text:
            return f" (node {node.name}, {node.domain + ':' if node.domain else ''}{node.op_type})"
    return ""
