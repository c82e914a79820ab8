"""Converters graphprune adds to onnx2torch's registry, for nodes its own ones refuse.

onnx2torch picks ``nn.BatchNorm1d/2d/3d`` (and the pooling classes) from the rank shape inference
gives the node's input; where inference cannot give one (a ``Conv`` reading a ``Reshape`` whose
shape is computed at run time, as in PaddleOCR's SVTR recogniser) it refuses the whole graph
("BatchNorm operation with spatial rank == -2"). The wrappers here keep onnx2torch's converter and
only step in where it raises:

* ``BatchNormalization`` with constant weights: :class:`AnyRankBatchNorm`, a batch norm over
  dimension 1 of an input of any rank, holding its weights and statistics as a ``BatchNorm2d``
  does (so they are trained, linked back to their initializers and written back alike);
* ``MaxPool``/``AveragePool``: the rank is ``2 + len(kernel_shape)``, which the node itself says;
* ``LayerNormalization`` with constant weights, whose input rank shape inference cannot give:
  onnx2torch takes the normalised shape from that rank and made it empty, and the layer failed at
  run time; the scale's own shape is the normalised shape (a transformer written back by the
  TorchScript exporter, whose LayerNorm reads a MultiheadAttention's output);
* ``NonZero``: ONNX gives the indices as (rank, count), onnx2torch's module as ``torch.nonzero``
  does, (count, rank); a GatherND reading them through the Transpose the exporters write (an
  ultralytics export with ``nms=True`` picks its candidate boxes so) then failed to run. Replaced,
  not wrapped: its converter never raises, its module is wrong;
* ``GridSample`` (opsets 16 and 20, 4-d), which onnx2torch has no converter for:
  ``F.grid_sample``, the op the exporters write it from (RT-DETR's deformable attention, as
  ultralytics exports it, samples its feature maps so);
* ``LSTM`` and ``GRU``, which onnx2torch has no converter for: :mod:`.onnx_recurrent`
  (a CRNN text recogniser's bidirectional LSTM over the columns);
* ``Clip`` (opset 11+) with one bound: both torch exporters write ``clamp(max=c)`` as
  ``Clip(x, "", c)``, whose empty name (an absent optional input) onnx2torch looked up as a tensor
  and refused as a "dynamic value". An absent bound is no bound.

:func:`register` installs them once (``io_onnx.convert`` calls it).
"""

from __future__ import annotations

import torch
from onnx import helper
from torch import nn

from .onnx_recurrent import VERSIONS as RECURRENT_VERSIONS
from .onnx_recurrent import convert_recurrent

_REGISTERED = False
_POOLS = ("MaxPool", "AveragePool")
_GRID_SAMPLE_VERSIONS = (16, 20)
_GRID_SAMPLE_MODES = {"linear": "bilinear", "cubic": "bicubic"}  # opset 20 names -> torch's


class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm2d`` without its rank check: normalises dimension 1 of any input of rank >= 2."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank 2 or more (got {input.dim()})")


def register() -> None:
    """Wrap onnx2torch's BatchNormalization and pooling converters (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    for description, converter in list(_CONVERTER_REGISTRY.items()):
        if description.domain not in ("", "ai.onnx"):
            continue
        if description.operation_type == "BatchNormalization":
            _CONVERTER_REGISTRY[description] = _batch_norm_fallback(converter)
        elif description.operation_type in _POOLS:
            _CONVERTER_REGISTRY[description] = _pool_fallback(converter)
        elif description.operation_type == "Clip" and description.version >= 11:
            _CONVERTER_REGISTRY[description] = _clip_fallback(converter)
        elif description.operation_type == "LayerNormalization":
            _CONVERTER_REGISTRY[description] = _layer_norm_shape(converter)
        elif description.operation_type == "NonZero":
            _CONVERTER_REGISTRY[description] = _non_zero
    from onnx2torch.node_converters.registry import OperationDescription

    for version in _GRID_SAMPLE_VERSIONS:
        _CONVERTER_REGISTRY.setdefault(OperationDescription("", "GridSample", version), _grid_sample)
    for kind, versions in RECURRENT_VERSIONS.items():
        for version in versions:
            _CONVERTER_REGISTRY.setdefault(OperationDescription("", kind, version), convert_recurrent)
    _REGISTERED = True


def _batch_norm_fallback(converter):
    def convert(node, graph):
        try:
            return converter(node, graph)
        except NotImplementedError:
            weights = node.input_values[1:]
            if len(node.output_values) != 1 or len(weights) != 4 or \
                    not all(name in graph.initializers for name in weights):
                raise
        return _any_rank_batch_norm(node, graph)
    return convert


def _any_rank_batch_norm(node, graph):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    scale, bias, mean, var = (graph.initializers[name].to_torch() for name in node.input_values[1:])
    module = AnyRankBatchNorm(scale.shape[0], eps=node.attributes.get("epsilon", 1e-5),
                              momentum=1 - node.attributes.get("momentum", 0.9))
    module.weight.data, module.bias.data = scale, bias
    module.running_mean.data, module.running_var.data = mean, var
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))


def _pool_fallback(converter):
    def convert(node, graph):
        try:
            return converter(node, graph)
        except (NotImplementedError, KeyError):  # KeyError: no value_info for the input at all
            kernel = node.attributes.get("kernel_shape")
            name = node.input_values[0]
            known = graph.value_info.get(name)
            if not kernel or (known is not None and len(known.type.tensor_type.shape.dim)):
                raise
        rank = 2 + len(kernel)
        graph._value_info[name] = helper.make_tensor_value_info(name, 1, [None] * rank)
        try:
            return converter(node, graph)
        finally:
            if known is None:
                del graph._value_info[name]
            else:
                graph._value_info[name] = known
    return convert


def _clip_fallback(converter):
    def convert(node, graph):
        try:
            return converter(node, graph)
        except NotImplementedError:
            if "" not in node.input_values[1:]:
                raise  # a bound computed at run time: refused as before
        return _one_sided_clip(node, graph)
    return convert


def _one_sided_clip(node, graph):
    from onnx2torch.node_converters.clip import _create_torch_module
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    names = (list(node.input_values[1:]) + ["", ""])[:2]
    try:
        low, high = (float(get_const_value(name, graph)) if name else None for name in names)
    except KeyError as exc:
        raise NotImplementedError("Clip with a bound computed at run time is not supported") from exc
    mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    return OperationConverterResult(torch_module=_create_torch_module(min_val=low, max_val=high), onnx_mapping=mapping)


def _layer_norm_shape(converter):
    def convert(node, graph):
        result = converter(node, graph)
        module = result.torch_module
        if isinstance(module, nn.LayerNorm) and module.weight is not None and \
                tuple(module.normalized_shape) != tuple(module.weight.shape):
            module.normalized_shape = tuple(module.weight.shape)
        return result
    return convert


class OnnxLayoutNonZero(nn.Module):
    """ONNX ``NonZero``: the indices of the non-zero elements as (rank, count)."""

    def forward(self, x):
        return torch.nonzero(x).t()


def _non_zero(node, graph):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    return OperationConverterResult(torch_module=OnnxLayoutNonZero(), onnx_mapping=mapping)


class OnnxGridSample(nn.Module):
    """ONNX ``GridSample`` on an (N, C, H, W) input: ``F.grid_sample``."""

    def __init__(self, mode: str, padding_mode: str, align_corners: bool):
        super().__init__()
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners

    def forward(self, x, grid):
        return nn.functional.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode,
                                         align_corners=self.align_corners)


def _grid_sample(node, graph):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    info = graph.value_info.get(node.input_values[0])
    if info is not None and len(info.type.tensor_type.shape.dim) not in (0, 4):
        raise NotImplementedError("GridSample is converted for 4-d inputs (N, C, H, W) only")
    mode = node.attributes.get("mode", "bilinear")
    module = OnnxGridSample(_GRID_SAMPLE_MODES.get(mode, mode), node.attributes.get("padding_mode", "zeros"),
                            bool(node.attributes.get("align_corners", 0)))
    mapping = OnnxMapping(inputs=tuple(node.input_values[:2]), outputs=node.output_values)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)
