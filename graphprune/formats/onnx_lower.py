"""Writing an ONNX-sourced model back out: the input graph, minus what the fx graph dropped.

The output is the *input* graph with the nodes the fx graph no longer has removed and every node's
inputs re-pointed to whatever fx value now feeds it; trained weights are written back into the
initializers they came from (:class:`~graphprune.formats.io_onnx.WeightLink`). Op types, attributes,
opset, input/output names and dynamic axes are those of the input. Re-exporting onnx2torch modules
through ``torch.onnx`` fails on transformer graphs; rewriting the original graph cannot.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper
from torch import fx

from ..errors import GraphpruneError
from ..model import Model
from .input_layout import META_KEY as INPUT_LAYOUT
from .io_onnx import OnnxOrigin, arg_links, onnx_index

# fx node meta of graphprune's resize of the image input (passes/resize_input.py): its scale, written
# as one ONNX Resize (linear, half-pixel: what F.interpolate computes without align_corners)
RESIZED_INPUT = "graphprune.resized_input"
# fx node meta of its mapping of a detector's boxes back to the input's pixels (passes/box_outputs.py):
# the output's axis that follows the input's size (None: none), written as one Mul by the node's factors
MAPPED_BOXES = "graphprune.mapped_boxes"
# Model.meta of a detector's anchor-grid constants written for another size (passes/anchor_grid.py):
# get_attr target -> its new tensor, written into the initializer it came from (its shape changed)
REGRIDDED = "regridded_constants"


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
    added_initializers: list[onnx.TensorProto] = []
    anchors_follow: dict[str, int | None] = {}  # a mapped box output's tensor: its axis that follows the size
    for fx_node in gm.graph.nodes:
        if fx_node.op in ("placeholder", "output"):
            continue
        if fx_node.meta.get(INPUT_LAYOUT):  # graphprune's channels-first view of the file's own input
            tensor_of[fx_node] = tensor_of[fx_node.args[0]]
            continue
        if fx_node.meta.get(RESIZED_INPUT):  # before every node of the file: it reads the graph input
            new_nodes[-1], extra = _resize_node(tensor_of[fx_node.args[0]], fx_node.meta[RESIZED_INPUT], base)
            added_initializers.extend(extra)
            tensor_of[fx_node] = new_nodes[-1].output[0]
            continue
        if MAPPED_BOXES in fx_node.meta:  # after every node of the file: it reads an output
            node, extra = _box_scale_node(tensor_of[fx_node.args[0]], fx_node.args[1], fx_node.args[2], base,
                                          f"graphprune_{fx_node.name}")
            new_nodes[len(base.graph.node) + len(new_nodes)] = node
            added_initializers.extend(extra)
            tensor_of[fx_node] = node.output[0]
            anchors_follow[node.output[0]] = fx_node.meta[MAPPED_BOXES]
            continue
        if fx_node.op == "get_attr":
            if fx_node.target not in origin.attr_initializers:
                raise GraphpruneError(f"cannot write ONNX: weight '{fx_node.target}' has no ONNX initializer")
            tensor_of[fx_node] = origin.attr_initializers[fx_node.target]
            continue
        index = onnx_index(fx_node)
        if index is None and fx_node.op == "call_function" and fx_node.target.__name__ == "getitem":
            producer, position = fx_node.args
            tensor_of[fx_node] = base.graph.node[onnx_index(producer)].output[position]
            continue
        if index is None:
            raise GraphpruneError(
                f"cannot write ONNX: node '{fx_node.name}' ({fx_node.op} {fx_node.target}) is not an ONNX node; "
                "fold it into its neighbours first"
            )
        onnx_node = copy.deepcopy(base.graph.node[index])
        renames = {name: tensor_of[arg] for arg, name in arg_links(fx_node, gm)}
        for slot, name in enumerate(onnx_node.input):
            onnx_node.input[slot] = renames.get(name, name)
        tensor_of[fx_node] = onnx_node.output[0]
        new_nodes[index] = onnx_node
    _add_conversion_time_producers(new_nodes, base)

    out = onnx.ModelProto()
    out.CopyFrom(base)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes[i] for i in sorted(new_nodes))
    out.graph.initializer.extend(added_initializers)
    outputs = gm.graph.output_node().args[0]
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    for value, declared, fx_value in zip(base.graph.output, out.graph.output, outputs):
        if tensor_of[fx_value] != value.name:  # the output now comes from elsewhere: keep its name
            _rename_tensor(out.graph, value.name, _free_prefix(f"{value.name}_graphprune_raw", base))
            out.graph.node.append(onnx.helper.make_node("Identity", [tensor_of[fx_value]], [value.name]))
        axis = anchors_follow.get(tensor_of[fx_value])
        dims = declared.type.tensor_type.shape.dim
        if axis is not None and axis < len(dims) and dims[axis].HasField("dim_value"):
            dims[axis].dim_param = "anchors"  # its length follows the internal size, no longer the file's
    regridded = _write_regridded(out, model)
    if regridded or any(RESIZED_INPUT in n.meta for n in gm.graph.nodes):
        # the shapes the file records for the tensors in between are the input size's: a quantiser that
        # reads them writes ops onnxruntime refuses (ResNet-56 at 26 px: QLinearAdd "Incompatible dimensions")
        del out.graph.value_info[:]
    _write_back_weights(out, model, skip=regridded)
    _prune(out)
    return out


def _write_regridded(proto: onnx.ModelProto, model: Model) -> set[str]:
    """The anchor-grid constants written for another size into their initializers; their names."""
    values = model.meta.get(REGRIDDED) or {}
    by_name = {t.name: t for t in proto.graph.initializer}
    names = set()
    for target, value in values.items():
        name = model.onnx.attr_initializers.get(target)
        if name not in by_name:
            raise GraphpruneError(f"cannot write ONNX: constant '{target}' has no ONNX initializer")
        dtype = numpy_helper.to_array(by_name[name]).dtype
        by_name[name].CopyFrom(numpy_helper.from_array(value.detach().cpu().numpy().astype(dtype), name))
        names.add(name)
    return names


def _resize_node(source: str, scale: tuple[float, float], base: onnx.ModelProto) -> tuple[onnx.NodeProto,
                                                                                         list[onnx.TensorProto]]:
    """The Resize of ``source`` by ``scale`` (height, width) on its two spatial axes, and its roi and
    scales initializers (roi empty: opsets 11 and 12 take the input, later ones an empty one alike)."""
    prefix = _free_prefix("graphprune_resize", base)
    roi = numpy_helper.from_array(np.zeros(0, np.float32), f"{prefix}_roi")
    scales = numpy_helper.from_array(np.array([1.0, 1.0, *scale], np.float32), f"{prefix}_scales")
    node = onnx.helper.make_node("Resize", [source, roi.name, scales.name], [f"{prefix}_output"], name=prefix,
                                 mode="linear", coordinate_transformation_mode="half_pixel")
    return node, [roi, scales]


def _box_scale_node(source: str, factors: tuple[float, ...], axis: int, base: onnx.ModelProto, stem: str
                    ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The Mul of ``source`` by ``factors`` along ``axis`` (of a rank-3 box output), and its
    initializer, named from ``stem`` (the fx node's name: one per output)."""
    prefix = _free_prefix(stem, base)
    shape = [1, 1, 1]
    shape[axis] = len(factors)
    weights = numpy_helper.from_array(np.array(factors, np.float32).reshape(shape), f"{prefix}_factors")
    return onnx.helper.make_node("Mul", [source, weights.name], [f"{prefix}_output"], name=prefix), [weights]


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Tensor ``old``, where a node still writes it, renamed ``new`` in its producer and readers (a
    graph output now written by a node graphprune adds after it: one name, one producer)."""
    if not any(old in node.output for node in graph.node):
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _free_prefix(stem: str, base: onnx.ModelProto) -> str:
    """``stem`` (or ``stem1``, ...) that no name in ``base`` starts with."""
    taken = {n for node in base.graph.node for n in (*node.input, *node.output)} | \
        {t.name for t in base.graph.initializer} | {i.name for i in base.graph.input}
    return next(p for p in (f"{stem}{i or ''}" for i in range(len(taken) + 1))
                if not any(name.startswith(p) for name in taken))


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


def _write_back_weights(proto: onnx.ModelProto, model: Model, skip: set[str] = frozenset()) -> None:
    links = model.onnx.weight_links
    state = model.graph_module.state_dict()
    by_name = {t.name: t for t in proto.graph.initializer}
    written: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        link = links.get(key)
        if link is None or link.initializer not in by_name or link.initializer in skip:
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
