"""ONNX in and out.

Reading: the file is checked (``onnx.checker``, opset >= 9, finite weights, every op supported by
onnx2torch; external data only from the model's own folder), simplified with onnxsim, and converted
with onnx2torch into an fx graph with exactly one ``call_module`` node per ONNX node (module
``n<i>`` is ONNX node ``i``). Each fx node gets ``meta["onnx_op"]`` and ``meta["scope"]`` (the
module path the exporter wrote into the node name).

Writing (:func:`lower`): the output is the *input* graph with the nodes the fx graph no longer has
removed and every node's inputs re-pointed to whatever fx value now feeds it; trained weights are
written back into the initializers they came from (:class:`WeightLink`). Op types, attributes,
opset, input/output names and dynamic axes are those of the input. Re-exporting onnx2torch modules
through ``torch.onnx`` fails on transformer graphs; rewriting the original graph cannot.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from .errors import GraphpruneError
from .model import InputSpec, Model
from .scopes import scope_from_onnx_metadata, scope_from_onnx_name

BLOCK_NAMES_KEY = "graphprune.block_names"  # model metadata: JSON [[merge node name, block name], ...]
MAX_MODEL_BYTES = 4 * 2**30  # refuse anything larger (protobuf + external data)
MIN_OPSET = 9
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


# ----------------------------------------------------------------------------------------------
# Reading

def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file safely: size limits, and external data only from the model's folder."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"model file not found: {path}")
    if path.is_dir():
        raise GraphpruneError(f"model path is a folder, not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise GraphpruneError(f"model file is empty: {path}")
    if size > MAX_MODEL_BYTES:
        raise GraphpruneError(f"model file is larger than {MAX_MODEL_BYTES >> 30} GiB: {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish or ValueError
        raise GraphpruneError(f"not a readable ONNX file: {path} ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise GraphpruneError(f"not an ONNX model (no graph nodes): {path}")
    _load_external_data(proto, path.parent)
    return proto


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    external = [t for t in _all_initializers(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    base = base_dir.resolve()
    total = 0
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise GraphpruneError(
                f"external data '{location}' of tensor '{tensor.name}' is outside the model's folder"
            )
        if not target.is_file():
            raise GraphpruneError(f"external data file not found: {location}")
        total += int(info.get("length", target.stat().st_size))
        if total > MAX_MODEL_BYTES:
            raise GraphpruneError(f"external data is larger than {MAX_MODEL_BYTES >> 30} GiB")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise GraphpruneError(f"could not read the model's external data ({exc})") from None


def _all_initializers(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def check_onnx(proto: onnx.ModelProto, label: str) -> None:
    """Structural validity, opset range and finite weights, each as a one-line error."""
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphpruneError(f"invalid ONNX model {label}: {first[:300]}") from None
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        raise GraphpruneError(f"ONNX opset {opset} is not supported (need {MIN_OPSET} or newer): {label}")
    for tensor in _all_initializers(proto):
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            values = numpy_helper.to_array(tensor)
            if values.size and not np.isfinite(values).all():
                raise GraphpruneError(f"weight '{tensor.name}' contains NaN or infinite values: {label}")


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def simplify(proto: onnx.ModelProto, fuse: bool = True) -> onnx.ModelProto:
    """onnxsim: constant folding and, with ``fuse``, its graph fusions (which rename the nodes
    they create, so inputs are read with ``fuse=False`` to keep the exporter's module paths).
    The input is returned unchanged if onnxsim cannot help."""
    try:
        import onnxsim
    except ImportError:  # onnxsim is a dependency; tolerate its absence on bare GPU images
        return proto
    try:
        with quiet_native_output():  # onnxsim prints warnings from C++ straight to stdout
            simplified, ok = onnxsim.simplify(copy.deepcopy(proto), perform_optimization=fuse)
    except Exception:
        return proto
    return simplified if ok else proto


@contextlib.contextmanager
def quiet_native_output():
    """Silence stdout/stderr at the file-descriptor level (native libraries bypass sys.stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Constant nodes become initializers (onnx2torch reads conv weights only from initializers)."""
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and not node.domain and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                value = np.array(attr.f if attr.name == "value_float" else attr.i,
                                 dtype=np.float32 if attr.name == "value_float" else np.int64)
            elif attr.name in ("value_floats", "value_ints"):
                value = np.array(list(attr.floats) if attr.name == "value_floats" else list(attr.ints),
                                 dtype=np.float32 if attr.name == "value_floats" else np.int64)
            if value is not None:
                proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _untie_initializers(proto: onnx.ModelProto) -> None:
    """Give every node its own copy of a float weight that several nodes read.

    Exporters deduplicate identical initializers (zero biases, tied weights); recovery trains each
    use separately, so each use needs its own tensor to be written back to."""
    by_name = {t.name: t for t in proto.graph.initializer}
    seen: set[str] = set()
    for node in proto.graph.node:
        for slot, name in enumerate(node.input):
            tensor = by_name.get(name)
            if tensor is None or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                          onnx.TensorProto.DOUBLE):
                continue
            if name not in seen:
                seen.add(name)
                continue
            if int(np.prod(tensor.dims)) <= 1:
                continue  # scalars (epsilons, exponents) are constants, never trained
            copy_name = f"{name}__use{len(seen)}"
            seen.add(copy_name)
            duplicate = proto.graph.initializer.add()
            duplicate.CopyFrom(tensor)
            duplicate.name = copy_name
            node.input[slot] = copy_name


def _strip_initializer_inputs(proto: onnx.ModelProto) -> None:
    names = {t.name for t in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types (with their opset) that onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    versions = {e.domain or "": e.version for e in proto.opset_import}
    missing = set()
    for node in proto.graph.node:
        version = versions.get(node.domain or "", versions.get("", 0))
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            missing.add(f"{(node.domain + '.') if node.domain else ''}{node.op_type}-{version}")
    return sorted(missing)


def _input_specs(proto: onnx.ModelProto) -> tuple[InputSpec, ...]:
    specs = []
    for value in proto.graph.input:
        ttype = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in ttype.shape.dim)
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise GraphpruneError(f"input '{value.name}' has an unsupported element type {ttype.elem_type}")
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
    """Convert a checked ``ModelProto`` into a :class:`Model` (verified against onnxruntime)."""
    proto = copy.deepcopy(proto)
    _strip_initializer_inputs(proto)
    _constants_to_initializers(proto)
    proto = simplify(proto, fuse=False)
    _untie_initializers(proto)
    missing = unsupported_ops(proto)
    if missing:
        upgraded = _try_upgrade(proto)
        if upgraded is None or unsupported_ops(upgraded):
            raise GraphpruneError(f"unsupported ONNX ops in {label}: {', '.join(missing)}")
        proto = upgraded
    if not proto.graph.input:
        raise GraphpruneError(f"the model has no inputs: {label}")
    gm, origin = convert(proto)
    model = Model(
        graph_module=gm,
        source="onnx",
        inputs=_input_specs(proto),
        output_names=tuple(o.name for o in proto.graph.output),
        name=proto.graph.name or "model",
        onnx=origin,
        input_shape=tuple(input_shape) if input_shape else None,
    )
    verify_against_onnxruntime(proto, model, what="conversion of " + label)
    return model


def _try_upgrade(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """Old opsets sometimes convert once upgraded (onnx2torch covers mainly opset 11+)."""
    try:
        upgraded = onnx.version_converter.convert_version(proto, 13)
        onnx.checker.check_model(upgraded)
        return upgraded
    except Exception:
        return None


def convert(proto: onnx.ModelProto) -> tuple[fx.GraphModule, OnnxOrigin]:
    """onnx2torch conversion with one fx module ``n<i>`` per ONNX node ``i``."""
    import onnx2torch

    renamed = copy.deepcopy(proto)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"n{i}"
    try:
        gm = onnx2torch.convert(renamed, attach_onnx_mapping=True)
    except Exception as exc:
        raise GraphpruneError(f"could not convert the ONNX graph: {type(exc).__name__}: {str(exc)[:200]}") from None

    nodes = proto.graph.node
    initializer_names = {t.name for t in proto.graph.initializer}
    attr_initializers: dict[str, str] = {}
    block_names = _recorded_block_names(proto)
    for fx_node in gm.graph.nodes:
        index = _onnx_index(fx_node)
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
        for arg, onnx_input in _arg_links(fx_node, gm):
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


def _onnx_index(fx_node: fx.Node) -> int | None:
    if fx_node.op == "call_module" and str(fx_node.target).startswith("n") and str(fx_node.target)[1:].isdigit():
        return int(str(fx_node.target)[1:])
    return None


def _arg_links(fx_node: fx.Node, gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
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
        index = _onnx_index(fx_node)
        if index is None:
            continue
        module = gm.get_submodule(fx_node.target)
        candidates = [n for n in proto.graph.node[index].input if n in inits]
        for pname, tensor in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
            key = f"{fx_node.target}.{pname}"
            link = _match_tensor(tensor.detach().cpu().numpy(), candidates, inits)
            if link is not None:
                links[key] = link
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
# Writing

def lower(model: Model) -> onnx.ModelProto:
    """The input ONNX graph, restricted to what the fx graph still computes, with its weights."""
    origin: OnnxOrigin = model.onnx
    base = origin.proto
    gm = model.graph_module
    tensor_of: dict[fx.Node, str] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for fx_node, value in zip(placeholders, base.graph.input):
        tensor_of[fx_node] = value.name

    new_nodes: dict[int, onnx.NodeProto] = {}
    for fx_node in gm.graph.nodes:
        if fx_node.op in ("placeholder", "output"):
            continue
        if fx_node.op == "get_attr":
            if fx_node.target not in origin.attr_initializers:
                raise GraphpruneError(f"cannot write ONNX: weight '{fx_node.target}' has no ONNX initializer")
            tensor_of[fx_node] = origin.attr_initializers[fx_node.target]
            continue
        index = _onnx_index(fx_node)
        if index is None and fx_node.op == "call_function" and fx_node.target.__name__ == "getitem":
            producer, position = fx_node.args
            tensor_of[fx_node] = base.graph.node[_onnx_index(producer)].output[position]
            continue
        if index is None:
            raise GraphpruneError(
                f"cannot write ONNX: node '{fx_node.name}' ({fx_node.op} {fx_node.target}) is not an ONNX node; "
                "fold it into its neighbours first"
            )
        onnx_node = copy.deepcopy(base.graph.node[index])
        renames = {name: tensor_of[arg] for arg, name in _arg_links(fx_node, gm)}
        for slot, name in enumerate(onnx_node.input):
            onnx_node.input[slot] = renames.get(name, name)
        tensor_of[fx_node] = onnx_node.output[0]
        new_nodes[index] = onnx_node
    _add_conversion_time_producers(new_nodes, base)

    out = onnx.ModelProto()
    out.CopyFrom(base)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes[i] for i in sorted(new_nodes))
    outputs = gm.graph.output_node().args[0]
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    for value, fx_value in zip(base.graph.output, outputs):
        if tensor_of[fx_value] != value.name:  # the output now comes from elsewhere: keep its name
            out.graph.node.append(onnx.helper.make_node("Identity", [tensor_of[fx_value]], [value.name]))
    _write_back_weights(out, model)
    _prune(out)
    return out


def _add_conversion_time_producers(nodes: dict[int, onnx.NodeProto], base: onnx.ModelProto) -> None:
    """Bring back producers the fx graph does not model: onnx2torch reads some inputs (a Clip's
    bounds, a Reshape's shape from a Constant node) at conversion time, so fx has no edge to them."""
    producer = {out: i for i, node in enumerate(base.graph.node) for out in node.output}
    available = {i.name for i in base.graph.input} | {t.name for t in base.graph.initializer}
    stack = list(nodes.values())
    while stack:
        node = stack.pop()
        for name in list(node.input) + sorted(_subgraph_inputs(node)):
            index = producer.get(name)
            if name and name not in available and index is not None and index not in nodes:
                nodes[index] = copy.deepcopy(base.graph.node[index])
                stack.append(nodes[index])


def _write_back_weights(proto: onnx.ModelProto, model: Model) -> None:
    links = model.onnx.weight_links
    state = model.graph_module.state_dict()
    by_name = {t.name: t for t in proto.graph.initializer}
    written: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        link = links.get(key)
        if link is None or link.initializer not in by_name:
            continue
        if not tensor.is_floating_point():
            continue  # only float tensors are ever trained
        init = by_name[link.initializer]
        original = numpy_helper.to_array(init)
        value = tensor.detach().cpu().numpy()
        if link.transform == "transpose":
            value = value.T
        value = value.reshape(original.shape).astype(original.dtype, copy=True)  # keeps 0-d as 0-d
        if link.initializer in written and not np.allclose(written[link.initializer], value):
            raise GraphpruneError(f"cannot write ONNX: shared weight '{link.initializer}' was trained to two values")
        written[link.initializer] = value
        if not np.array_equal(original, value):
            init.CopyFrom(numpy_helper.from_array(value, link.initializer))


def _prune(proto: onnx.ModelProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in proto.graph.output}
    kept = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    kept.reverse()
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    inits = [t for t in proto.graph.initializer if t.name in needed]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    value_info = [v for v in proto.graph.value_info if v.name in needed]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(value_info)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names = set()
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                names.update(inner.input)
    return names


# ----------------------------------------------------------------------------------------------
# Checking

def run_onnxruntime(proto_or_bytes, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    import onnxruntime as ort

    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def verify_against_onnxruntime(proto: onnx.ModelProto, model: Model, what: str, atol: float = 1e-3) -> None:
    """The fx graph and onnxruntime agree on a random batch of 2 (relative to the output scale)."""
    try:
        inputs = model.example_inputs(batch_size=2 if model.inputs[0].shape[:1] == (None,) else 1)
    except GraphpruneError:
        return  # dynamic spatial dims and no --input-shape: checked later, when a shape is known
    try:
        expected = run_onnxruntime(proto, inputs)[0]
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot run {what}: {str(exc).splitlines()[0][:200]}") from None
    got = model.run(*inputs)
    if got is None or tuple(got.shape) != tuple(expected.shape):
        raise GraphpruneError(f"{what}: output shape {tuple(expected.shape)} differs from the converted graph's")
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(got.float().numpy() - expected).max())
    if not error <= atol * scale:
        raise GraphpruneError(f"{what}: converted graph differs from onnxruntime by {error:.3g}")
