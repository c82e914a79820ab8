"""ONNX in: a checked, normalised file (:mod:`graphprune.formats.onnx_read`) converted to fx.

onnx2torch converts the graph into an fx graph with exactly one ``call_module`` node per ONNX node
(module ``n<i>`` is ONNX node ``i``). Each fx node gets ``meta["onnx_op"]`` and ``meta["scope"]``
(the module path the exporter wrote into the node name), and every fx weight a
:class:`WeightLink` to the initializer it came from, so :mod:`graphprune.formats.onnx_lower` can write the
model back as the input graph itself. :func:`verify_against_onnxruntime` checks a conversion or an
output against onnxruntime.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from ..errors import GraphpruneError, first_line
from ..model import HALF_DTYPES, InputSpec, Model
from ..ops import merge_duplicate_getitems
from ..scopes import scope_from_onnx_metadata, scope_from_onnx_name
from ..steplog import timed_step
from .batch_axis import free_fixed_batch
from .input_layout import is_channels_last, to_channels_first
from .input_shape import recorded_detection_rows, recorded_normalisation, resolve_input_shape
from .onnx_opset import default_opset
from .onnx_read import check_onnx, normalise, read_onnx
from .ort_run import run_onnxruntime

BLOCK_NAMES_KEY = "graphprune.block_names"  # model metadata: JSON [[merge node name, block name], ...]
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT8: torch.uint8,
}


@dataclass
class WeightLink:
    """Where an fx tensor's value lives in the ONNX graph: ``initializer`` after ``transform``
    (``"same"``, ``"transpose"`` or ``"reshape"``) gives the fx tensor."""

    initializer: str
    transform: str = "same"


@dataclass
class OnnxOrigin:
    """The simplified input graph and the links from the fx graph back to it."""

    proto: onnx.ModelProto
    # fx ``get_attr`` target -> initializer name, and fx parameter/buffer -> initializer.
    attr_initializers: dict[str, str] = field(default_factory=dict)
    weight_links: dict[str, WeightLink] = field(default_factory=dict)
    path: str | None = None
    input_opset: int | None = None  # the file's own opset; a written graph is brought back up to it


def _type_name(elem_type: int) -> str:
    """ONNX's name of an element type (STRING, INT8, ...), or its number where ONNX has none."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def input_specs(proto: onnx.ModelProto) -> tuple[InputSpec, ...]:
    specs = []
    for value in proto.graph.input:
        ttype = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in ttype.shape.dim)
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise GraphpruneError(f"input '{value.name}' is of element type {_type_name(ttype.elem_type)}, which "
                                  f"graphprune cannot feed (it feeds {', '.join(map(_type_name, _ONNX_DTYPES))})")
        specs.append(InputSpec(value.name, dims, dtype))
    return tuple(specs)


def load_onnx(path: str | os.PathLike, input_shape: tuple[int, ...] | None = None) -> Model:
    """Read, check, simplify and convert an ONNX file into a :class:`Model`."""
    label = str(path)
    proto = read_onnx(path)
    check_onnx(proto, label)
    model = load_proto(proto, input_shape, label)
    model.name = Path(path).stem
    model.onnx.path = label
    return model


def load_proto(proto: onnx.ModelProto, input_shape: tuple[int, ...] | None = None, label: str = "the model") -> Model:
    """Convert a checked ``ModelProto`` into a :class:`Model` (verified against onnxruntime). Every
    rewrite on the way is a named, timed step; ``model.meta["load_seconds"]`` keeps the times."""
    timings: dict[str, float] = {}
    given = proto
    proto, own_opset = normalise(proto, label, timings)
    with timed_step("load:convert", timings):
        gm, origin = convert(proto)
    origin.input_opset = default_opset(own_opset)
    specs = input_specs(proto)
    input_shape, shape_source = resolve_input_shape(given, specs, input_shape)
    model = Model(
        graph_module=gm,
        source="onnx",
        inputs=specs,
        output_names=tuple(o.name for o in proto.graph.output),
        name=proto.graph.name or "model",
        onnx=origin,
        input_shape=input_shape,
    )
    model.meta["input_shape_source"] = shape_source
    model.meta["recorded_normalisation"] = recorded_normalisation(given)
    model.meta["detection_rows"] = recorded_detection_rows(given)
    with timed_step("load:verify", timings):
        verify_against_onnxruntime(proto, model, what="conversion of " + label)
        if own_opset is not proto:  # the opset was changed for the converter: same results as before?
            verify_against_onnxruntime(own_opset, model, what=f"opset {default_opset(proto)} form of " + label)
    with timed_step("load:free_fixed_batch", timings):
        free_fixed_batch(model)  # a batch of 1 baked into Reshape shapes would refuse the tiny set's batches
    with timed_step("load:compute_in_float32", timings):
        model = _compute_in_float32(model, proto, label)
    with timed_step("load:channels_first", timings):
        model = to_channels_first(model)
        if is_channels_last(model):  # the permute in front and the feeds' layout must agree
            verify_against_onnxruntime(proto, model, what="channels-first view of " + label)
    model.meta["load_seconds"] = timings
    return model


def _compute_in_float32(model: Model, proto: onnx.ModelProto, label: str) -> Model:
    """A half-precision file is analysed and trained in float32: the tiny set is float32 and CPU
    half kernels are slow or missing. Its inputs are then float32 to graphprune (onnxruntime is
    fed the file's own types, :func:`~.ort_run.ort_feeds`) and trained weights are written back in the
    file's dtype (``onnx_lower``). Kept only if the float32 graph still matches onnxruntime
    (a graph that casts to half inside stays as it was)."""
    gm = model.graph_module
    if not any(t.dtype in HALF_DTYPES for t in [*gm.parameters(), *gm.buffers()]):
        return model
    candidate = model.clone()
    candidate.graph_module.float()
    candidate.inputs = tuple(dataclasses.replace(s, dtype=torch.float32) if s.dtype in HALF_DTYPES else s
                             for s in model.inputs)
    try:
        verify_against_onnxruntime(proto, candidate, what=f"float32 form of {label}")
    except (GraphpruneError, RuntimeError):
        return model
    return candidate


def convert(proto: onnx.ModelProto) -> tuple[fx.GraphModule, OnnxOrigin]:
    """onnx2torch conversion with one fx module ``n<i>`` per ONNX node ``i``."""
    import onnx2torch

    from .onnx_converters import register

    register()
    renamed = copy.deepcopy(proto)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"n{i}"
    try:
        gm = onnx2torch.convert(renamed, attach_onnx_mapping=True)
    except Exception as exc:
        raise GraphpruneError(f"could not convert the ONNX graph: {type(exc).__name__}: {str(exc)[:200]}") from None

    merge_duplicate_getitems(gm)
    nodes = proto.graph.node
    initializer_names = {t.name for t in proto.graph.initializer}
    attr_initializers: dict[str, str] = {}
    block_names = _recorded_block_names(proto)
    for fx_node in gm.graph.nodes:
        index = onnx_index(fx_node)
        if index is None:
            continue
        onnx_node = nodes[index]
        fx_node.meta["onnx_op"] = onnx_node.op_type
        fx_node.meta["scope"] = _onnx_scope(onnx_node, initializer_names)
        fx_node.meta["onnx_name"] = onnx_node.name or f"{onnx_node.op_type}_{index}"
        if onnx_node.name in block_names:
            fx_node.meta["block_name"] = block_names[onnx_node.name]
        if onnx_node.op_type == "Pad":
            fx_node.meta["pad_value_zero"] = _pad_value_is_zero(onnx_node, proto)
        for arg, onnx_input in arg_links(fx_node, gm):
            if arg.op == "get_attr" and onnx_input in initializer_names:
                attr_initializers[arg.target] = onnx_input
    _promote_weights(gm, attr_initializers)
    origin = OnnxOrigin(proto=proto, attr_initializers=attr_initializers)
    origin.weight_links = _link_weights(gm, proto, attr_initializers)
    return gm, origin


def _recorded_block_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Block names graphprune wrote into a file it exported from PyTorch (see :func:`record_block_names`)."""
    import json

    for prop in proto.metadata_props:
        if prop.key == BLOCK_NAMES_KEY:
            try:
                return {str(node): str(name) for node, name in json.loads(prop.value)}
            except (ValueError, TypeError):
                return {}
    return {}


def record_block_names(proto: onnx.ModelProto, merges_to_names: list[tuple[str, str]]) -> None:
    """Store block names in the model metadata, so a file exported from an fx graph (whose node
    names lost the module paths) keeps the names ``inspect`` showed for the PyTorch model."""
    import json

    for prop in list(proto.metadata_props):
        if prop.key == BLOCK_NAMES_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = BLOCK_NAMES_KEY, json.dumps(merges_to_names)


def _onnx_scope(onnx_node: onnx.NodeProto, initializer_names: set[str]) -> str:
    """The module path of an ONNX node: from exporter metadata or the node name; for nodes a
    simplifier created (no path in the name), from the path-like names of the weights it reads
    (``layer1.0.conv1.weight``)."""
    props = {p.key: p.value for p in onnx_node.metadata_props}
    scope = scope_from_onnx_metadata(props)
    if scope is None:
        scope = scope_from_onnx_name(onnx_node.name)
    if scope:
        return scope
    for name in onnx_node.input:
        if name in initializer_names and "." in name and "::" not in name and "/" not in name:
            return name.rsplit(".", 1)[0]
    return ""


def onnx_index(fx_node: fx.Node) -> int | None:
    if fx_node.op == "call_module" and str(fx_node.target).startswith("n") and str(fx_node.target)[1:].isdigit():
        return int(str(fx_node.target)[1:])
    return None


def arg_links(fx_node: fx.Node, gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """(fx value, ONNX input name) for each value a converted node reads.

    onnx2torch passes the ONNX inputs named in the module's ``onnx_mapping`` as positional
    arguments, moving those after the first empty input to keyword arguments, in order.
    """
    names = [n for n in gm.get_submodule(fx_node.target).onnx_mapping.inputs if n]
    values = [v for v in list(fx_node.args) + list(fx_node.kwargs.values()) if isinstance(v, fx.Node)]
    if len(names) != len(values):
        raise GraphpruneError(f"unexpected onnx2torch conversion of node {fx_node.meta.get('onnx_name')}")
    return list(zip(values, names))


def _pad_value_is_zero(node: onnx.NodeProto, proto: onnx.ModelProto) -> bool:
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode != "constant":
        return False
    value = next((a.f for a in node.attribute if a.name == "value"), 0.0)
    if len(node.input) > 2 and node.input[2]:
        inits = {t.name: t for t in proto.graph.initializer}
        if node.input[2] not in inits:
            return False
        value = float(numpy_helper.to_array(inits[node.input[2]]).reshape(-1)[0])
    return value == 0.0


def _promote_weights(gm: fx.GraphModule, attr_initializers: dict[str, str]) -> None:
    """Turn weight-like float initializers into (frozen) parameters so training passes see them.

    Scalars (epsilons, exponents, clip bounds) and fills with at most two distinct values
    (attention masks) stay buffers: they are constants of the graph, not weights.
    """
    for target in attr_initializers:
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        tensor = getattr(owner, attr)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() <= 1:
            continue
        if tensor.numel() >= 16 and torch.unique(tensor).numel() <= 2:
            continue
        delattr(owner, attr)
        owner.register_parameter(attr, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))


def _link_weights(gm: fx.GraphModule, proto: onnx.ModelProto, attr_initializers: dict[str, str]) -> dict[str, WeightLink]:
    """Map every fx parameter/buffer to the initializer it was made from (matched by value)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    links: dict[str, WeightLink] = {}
    for target, init_name in attr_initializers.items():
        links[target] = WeightLink(init_name, "same")
    for fx_node in gm.graph.nodes:
        index = onnx_index(fx_node)
        if index is None:
            continue
        module = gm.get_submodule(fx_node.target)
        candidates = [n for n in proto.graph.node[index].input if n in inits]
        claimed: set[str] = set()
        for pname, tensor in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
            # One node's inputs can hold equal values (a fresh BatchNorm: scale = var = 1, bias =
            # mean = 0); each tensor takes an input no earlier tensor of the node took, so they
            # are written back to different initializers.
            value = tensor.detach().cpu().numpy()
            link = (_match_tensor(value, [c for c in candidates if c not in claimed], inits)
                    or _match_tensor(value, candidates, inits))
            if link is not None:
                links[f"{fx_node.target}.{pname}"] = link
                claimed.add(link.initializer)
    return links


def _match_tensor(value: np.ndarray, candidates: list[str], inits: dict[str, np.ndarray]) -> WeightLink | None:
    for name in candidates:
        ref = inits[name]
        if ref.dtype != value.dtype and not (ref.dtype.kind == value.dtype.kind == "f"):
            continue
        if ref.shape == value.shape and np.array_equal(ref, value):
            return WeightLink(name, "same")
        if ref.ndim == 2 and ref.T.shape == value.shape and np.array_equal(ref.T, value):
            return WeightLink(name, "transpose")
        if ref.size == value.size and np.array_equal(ref.reshape(value.shape), value):
            return WeightLink(name, "reshape")
    return None


# ----------------------------------------------------------------------------------------------
# Checking against onnxruntime

def _low_precision(proto: onnx.ModelProto) -> bool:
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return (any(t.data_type in half for t in proto.graph.initializer)
            or any(i.type.tensor_type.elem_type in half for i in proto.graph.input))


def verify_against_onnxruntime(proto: onnx.ModelProto, model: Model, what: str, atol: float = 1e-3) -> None:
    """The fx graph and onnxruntime agree on a random batch of 2 (relative to the output scale;
    to 2% of it for a half-precision file, which onnxruntime computes in half precision)."""
    if _low_precision(proto):
        atol = max(atol, 2e-2)
    try:
        inputs = model.example_inputs(batch_size=2 if model.inputs[0].shape[:1] == (None,) else 1)
    except GraphpruneError:
        return  # dynamic spatial dims and no --input-shape: checked later, when a shape is known
    try:
        expected = run_onnxruntime(proto, inputs, is_channels_last(model))[0]
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot run {what}: {first_line(exc)[:200]}") from None
    try:
        got = model.run(*inputs)
    except Exception as exc:  # a converter gap that shows only when the graph runs
        raise GraphpruneError(f"{what}: the converted graph cannot run: {first_line(exc)[:200]}") from None
    if got is None or tuple(got.shape) != tuple(expected.shape):
        raise GraphpruneError(f"{what}: output shape {tuple(expected.shape)} differs from the converted graph's")
    scale = max(1.0, float(np.abs(expected).max()))
    got = got.float().numpy()
    error = float(np.abs(got - expected).max())
    if not error <= atol * scale and not same_rows(got, expected, atol * scale):
        raise GraphpruneError(f"{what}: converted graph differs from onnxruntime by {error:.3g}")


def same_rows(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Two (N, K, F) outputs hold the same rows, in any order. A ranked list of detections (an
    ultralytics export with ``nms=True``, or the end-to-end head of YOLOv10/YOLO26: (N, 300, 6)) lists
    the boxes of equal score in whatever order its TopK or NonMaxSuppression kernel leaves them, and
    torch's and onnxruntime's differ."""
    if a.ndim != 3 or a.shape != b.shape or a.shape[1] * a.shape[1] * a.shape[2] > 2**24:
        return False
    for x, y in zip(a, b):
        distance = np.abs(x[:, None, :] - y[None, :, :]).max(axis=-1)
        if not (distance.min(axis=0) <= tolerance).all() or not (distance.min(axis=1) <= tolerance).all():
            return False
    return True
