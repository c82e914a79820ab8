"""Calibration for static int8: one float graph prepared once and its activation ranges.

:class:`Calibrated` holds a float ONNX graph ready to quantise many ways: per opset, the graph
converted, its nodes named (float groups exclude nodes by name) and ``quant_pre_process``-ed where
that works; per opset and calibration method, the ranges of its activations over every calibration
image, computed once by onnxruntime's calibrator and handed to ``quantize_static`` as its
calibration cache, so that every format and type quantises with the same ranges (MinMax, Entropy
and Percentile ranges do not depend on them).

Ranges can be *taken* from another graph (:meth:`Calibrated.take_ranges`): quantisation-aware
mimicking trains the weights for the rounding of the original's ranges, so the trained graph is
quantised with those for every tensor both graphs name, and with its own for the others.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import GraphpruneError, first_line
from ..formats.onnx_opset import default_opset
from ..formats.ort_run import cpu_session, image_batches
from ..memory import available_memory
from .float_groups import name_nodes

# A guard, not a measured knee: MinMax ranges are the extremes of the calibration activations, so
# from a handful of images they depend on those images. On CIFAR ResNet-56 (this CPU, 7-bit
# weights) top-1 was 92.6-92.9 from 4 (repeated), 16, 64 or 500 images (float 92.6), so the
# minimum costs nothing there; 16 is also graphprune's held-out minimum (data.split_holdout).
MIN_CALIBRATION_IMAGES = 16
METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # onnxruntime's
# The histogram methods (entropy, percentile) hold every calibration image's activations at once:
# onnxruntime's HistogramCalibrater keeps each batch's outputs until all are read, then merges
# them. PP-OCRv4's recogniser (48 x 320) with 200 text lines was killed for memory on a 24 GiB
# machine. So they read at most the images whose activations fit this share of the memory
# available (a guard, not a measured knee: the merge copies them once more).
HISTOGRAM_MEMORY_SHARE = 0.25


def as_images(images, what: str = "calibration") -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    if images.dim() != 4:
        raise GraphpruneError(f"{what} images must be (N, C, H, W), got shape {tuple(images.shape)}", parameter=what)
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise GraphpruneError(f"{what} needs at least {MIN_CALIBRATION_IMAGES} images, got {len(images)}",
                              parameter=what)
    return images


class Calibrated:
    """One float graph ready to quantise many ways: the graph per opset (converted, named,
    pre-processed) and one calibration per opset and method, reused by every format/type
    (MinMax/Entropy/Percentile ranges do not depend on them)."""

    def __init__(self, proto: onnx.ModelProto, calibration, batch_size: int = 32):
        self.source = proto
        self.images = as_images(calibration)
        self.batch_size = batch_size
        self.opset = default_opset(proto)
        self._dir = tempfile.TemporaryDirectory(prefix="graphprune-quant-")
        self._graphs: dict[int, tuple[onnx.ModelProto, list[str]]] = {}
        self.used: dict[str, int] = {}  # images each calibration method read (reader)
        self._borrowed: Calibrated | None = None  # whose ranges win for tensors named alike (take_ranges)

    def graph(self, opset: int) -> tuple[onnx.ModelProto, list[str]]:
        """The float graph to quantise at ``opset`` and the notes on how it was made."""
        if opset not in self._graphs:
            with quiet():
                self._graphs[opset] = self._make(opset)
        return self._graphs[opset]

    def path(self, opset: int) -> str:
        """:meth:`graph` as a file: onnxruntime's quantisation tools turn a ``ModelProto`` they
        are given into external-data references, so they only ever get paths."""
        self.graph(opset)
        return str(Path(self._dir.name) / f"pre{opset}.onnx")

    def _make(self, opset: int) -> tuple[onnx.ModelProto, list[str]]:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        proto, notes = onnx.ModelProto(), []
        proto.CopyFrom(self.source)
        if opset != self.opset:
            try:
                proto = onnx.version_converter.convert_version(proto, opset)
            except Exception as exc:
                raise GraphpruneError(f"cannot convert opset {self.opset} to {opset} for per-channel quantisation "
                                      f"({first_line(exc)}); use per_channel=False", parameter="per_channel") from None
            notes.append(f"opset {self.opset} converted to {opset}: per-channel DequantizeLinear (axis) needs opset 13")
        name_nodes(proto)  # nodes_to_exclude works by name
        path, raw = Path(self._dir.name) / f"pre{opset}.onnx", Path(self._dir.name) / f"float{opset}.onnx"
        onnx.save(proto, str(raw))
        try:
            quant_pre_process(str(raw), str(path), skip_symbolic_shape=True)
            proto = onnx.load(str(path))
        except Exception as exc:
            notes.append(f"quant_pre_process failed ({first_line(exc)}); quantised without it")
            onnx.save(proto, str(path))
        return proto, notes

    def take_ranges(self, other: "Calibrated") -> None:
        """Quantise with the calibration ranges ``other`` computed for every tensor named alike in
        both graphs (quantisation-aware mimicking trains the weights for ``other``'s rounding), and
        with this graph's own for the rest: a graph converted back from the trained fx graph may
        name a tensor ``other``'s lacks (PP-OCRv4's detector: a Conv's output that onnxruntime's
        pre-processing fused with its BatchNorm in ``other`` but not here)."""
        self._borrowed = other

    def ranges_file(self, opset: int, method: str) -> str:
        """The calibration ranges of :meth:`graph` at ``opset`` by ``method`` as onnxruntime's
        calibration cache (JSON), computed once: this graph's own (onnxruntime's calibrator, as
        ``quantize_static`` runs it), ``take_ranges``' where a tensor is in both."""
        from onnxruntime.quantization import CalibrationMethod, create_calibrator
        from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

        path = Path(self._dir.name) / f"ranges{opset}-{method}.json"
        if path.exists():
            return str(path)
        graph, _ = self.graph(opset)
        with quiet(), tempfile.TemporaryDirectory(prefix="graphprune-calib-") as work:
            calibrator = create_calibrator(Path(self.path(opset)), None,
                                           augmented_model_path=str(Path(work) / "augmented.onnx"),
                                           calibrate_method=getattr(CalibrationMethod, METHOD_NAMES[method]))
            calibrator.collect_data(self.reader(graph, method))
            ranges = calibrator.compute_data()
            del calibrator  # its session holds the augmented file
        if self._borrowed is not None:
            borrowed = load_tensors_data(self._borrowed.ranges_file(opset, method))
            for name in ranges.keys() & borrowed.keys():
                ranges[name] = borrowed[name]
        save_tensors_data(ranges, path)
        return str(path)

    def reader(self, proto: onnx.ModelProto, method: str = "minmax"):
        """The calibration data, batched. The histogram methods stack every batch's activations
        into one array (onnxruntime's HistogramCollector), so their batches are all the same size and
        the remainder is left out (200 images in batches of 32 failed: "inhomogeneous shape"), and
        they read at most :func:`histogram_images`; ``used[method]`` says how many images were read."""
        from onnxruntime.quantization import CalibrationDataReader

        images = self.images if method == "minmax" else self.images[:histogram_images(proto, len(self.images))]
        batches = list(image_batches(cpu_session(proto, "the float model"), images, min(self.batch_size, len(images)),
                                     equal=method != "minmax"))
        self.used[method] = sum(len(next(iter(feeds.values()))) for feeds in batches)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.pending = iter(batches)

            def get_next(self):
                return next(self.pending, None)

        return Reader()




def histogram_images(proto: onnx.ModelProto, count: int, available: int | None = None) -> int:
    """How many of ``count`` calibration images a histogram method may read: those whose float
    activations (every tensor shape inference sizes at batch 1) fit ``HISTOGRAM_MEMORY_SHARE`` of
    ``available`` bytes (default: the memory available now), at least ``MIN_CALIBRATION_IMAGES``
    (or ``count`` where fewer); ``count`` where either is unknown."""
    per_image = activation_bytes(proto)
    available = available_memory() if available is None else available
    if not per_image or available is None:
        return count
    return min(count, max(MIN_CALIBRATION_IMAGES, int(HISTOGRAM_MEMORY_SHARE * available // per_image)))


def activation_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the float tensors one image makes in ``proto``: its input's batch set to 1, every
    tensor computed from the input that shape inference then sizes (tensors of unknown size are
    not counted)."""
    single = onnx.ModelProto()
    single.CopyFrom(proto)
    for value in single.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(single)
    except Exception:  # a graph shape inference cannot read: no estimate
        return 0
    computed = {value.name for value in single.graph.input}  # tensors computed from the image, not constants
    for node in single.graph.node:
        if any(name in computed for name in node.input):
            computed.update(node.output)
    total = 0
    for value in inferred.graph.value_info:
        kind = value.type.tensor_type
        if (value.name in computed and kind.elem_type == onnx.TensorProto.FLOAT
                and all(d.HasField("dim_value") for d in kind.shape.dim)):
            total += 4 * int(np.prod([d.dim_value for d in kind.shape.dim]))
    return total


@contextmanager
def quiet():
    """onnxruntime's quantisation tools log warnings and tracebacks (root and module loggers) for
    conditions graphprune handles or reports itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)
