"""A PyTorch-sourced model (``nn.Module``, ``.pt2``) written as ONNX: :func:`export_onnx`.

``torch.onnx.export``: the TorchScript exporter at opset 17, falling back to 14, then the dynamo
exporter, with the batch axis dynamic (and the input's other dynamic axes, a program's height and
width). Sizes the graph reads from its input (``sym_size``) are exported as ``x.size(d)``
(:func:`_traced_sizes`); a file onnxruntime does not run as the graph computes, at a batch of two,
is not taken. Each output is named (``output``, or ``output0``, ``output1``, ...) and declared with
the sizes it has at any batch (:func:`_declare_output_shapes`: the exporter left every size of a
second output symbolic).
"""

from __future__ import annotations

import io
import itertools
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import onnx
import torch
from torch import fx

from ..errors import GraphpruneError, first_line
from ..model import Model
from .batch_axis import SIZED_OPS
from .io_onnx import verify_against_onnxruntime
from .io_torch import batch_is_dynamic, export_dynamic_shapes, other_dynamic_axes


def export_onnx(model: Model) -> bytes:
    """The model as ONNX bytes (module docstring)."""
    gm = model.graph_module.eval()
    example = model.example_inputs()
    input_names = [s.name for s in model.inputs]
    output_names = list(model.output_names) or ["output"]
    free_axes = other_dynamic_axes(model)
    with _no_attention_fast_path(), _traced_sizes(gm):
        data = _export_onnx(model, example, input_names, output_names, free_axes, batch_is_dynamic(model))
    return data if any(free_axes) else _declare_output_shapes(data, model)


def _declare_output_shapes(data: bytes, model: Model) -> bytes:
    """Each output declared with its sizes where they are the same at a batch of one and two (all but
    the batch, for an image model's outputs), the batch axis named ``batch``."""
    with torch.no_grad():
        shapes = [[tuple(t.shape) for t in _tensors(model.graph_module(*model.example_inputs(batch_size=b)))]
                  for b in ((1, 2) if batch_is_dynamic(model) else (1,))]
    proto = onnx.load_model_from_string(data)
    for index, value in enumerate(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        per_batch = [shape[index] for shape in shapes if index < len(shape)]
        if len(per_batch) != len(shapes) or any(len(shape) != len(dims) for shape in per_batch):
            continue  # the graph returns otherwise than the file declares: nothing to say
        for axis, dim in enumerate(dims):
            sizes = {shape[axis] for shape in per_batch}
            if len(sizes) == 1:
                dim.dim_value = sizes.pop()
            elif axis == 0:
                dim.dim_param = "batch"
    return proto.SerializeToString()


def _tensors(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(t, torch.Tensor)]


def _export_onnx(model: Model, example, input_names, output_names, free_axes, batched: bool) -> bytes:
    """The first of the exporters whose file onnxruntime runs as the graph does: the TorchScript
    exporter writes sizes read from the input (``sym_size``, a channel shuffle's) as the example's
    constants where :func:`_traced_sizes` cannot reach them (a file that fails at a batch of two),
    and can compute otherwise than the graph (torchvision's swin_t read from a ``.pt2``: 0.034 off);
    the dynamo exporter keeps both right."""
    gm = model.graph_module
    batch_axis = {0: "batch"} if batched else {}
    dynamic_axes = {name: batch_axis for name in output_names}
    dynamic_axes.update({name: {**batch_axis, **{a: f"{name}_{a}" for a in axes}}
                         for name, axes in itertools.zip_longest(input_names, free_axes, fillvalue=())})
    errors = []
    for opset in (17, 14):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(gm, example, buffer, opset_version=opset, dynamo=False,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
            verify_against_onnxruntime(onnx.load_model_from_string(buffer.getvalue()), model,
                                       what=f"the TorchScript export (opset {opset})")
            return buffer.getvalue()
        except Exception as exc:
            errors.append(f"opset {opset}: {first_line(exc)[:160]}")
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if batched:  # export specialises a batch of 1, and fails where the graph's range starts at 2
                example = tuple(torch.cat([t, t]) for t in example)
            dynamic = export_dynamic_shapes(example, free_axes, torch.export.Dim("batch", min=1) if batched else None)
            program = torch.onnx.export(gm, example, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic)
        return program.model_proto.SerializeToString()
    except Exception as exc:
        errors.append(f"dynamo: {first_line(exc)[:160]}")
    raise GraphpruneError("ONNX export failed (" + "; ".join(errors) + ")")


@contextmanager
def _traced_sizes(gm: fx.GraphModule):
    """``aten.sym_size.int(x, d)`` nodes (a dynamic-batch program's sizes read from its input, or
    those :func:`~graphprune.formats.batch_axis.free_view_batches` adds) as ``x.size(d)``, and the
    ``view``/``reshape``/``expand`` ops that take them as tensor methods, while exporting: the
    TorchScript exporter records those as Shape -> Gather -> Reshape, but writes the ints the aten
    ops return and take as the example's constants (a file that then fails at any other batch)."""
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.sym_size.int:
            changed.append((node, node.target))
            node.op, node.target = "call_method", "size"
        elif str(node.target) in SIZED_OPS and any(isinstance(a, fx.Node) for a in node.args[1]):
            changed.append((node, node.target))
            node.op, node.target = "call_method", SIZED_OPS[str(node.target)]  # what the tracer records
    if changed:
        gm.recompile()
    try:
        yield
    finally:
        for node, target in changed:
            node.op, node.target = "call_function", target
        if changed:
            gm.recompile()


@contextmanager
def _no_attention_fast_path():
    """``nn.MultiheadAttention`` in eval mode with no weight requiring grad (a recovered model:
    recovery freezes every weight) takes its fused fast path, ``aten::_native_multi_head_attention``,
    which no ONNX exporter can write; the unfused path computes the same attention."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
