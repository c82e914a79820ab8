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
    for value, fx_value in zip(base.graph.output, outputs):
        if tensor_of[fx_value] != value.name:  # the output now comes from elsewhere: keep its name
            out.graph.node.append(onnx.helper.make_node("Identity", [tensor_of[fx_value]], [value.name]))
    _write_back_weights(out, model)
    _prune(out)
    return out


def _resize_node(source: str, scale: tuple[float, float], base: onnx.ModelProto) -> tuple[onnx.NodeProto,
                                                                                         list[onnx.TensorProto]]:
    """The Resize of ``source`` by ``scale`` (height, width) on its two spatial axes, and its roi and
    scales initializers (roi empty: opsets 11 and 12 take the input, later ones an empty one alike)."""
    taken = {n for node in base.graph.node for n in (*node.input, *node.output)} | \
        {t.name for t in base.graph.initializer} | {i.name for i in base.graph.input}
    prefix = next(p for p in (f"graphprune_resize{i or ''}" for i in range(len(taken) + 1))
                  if not any(name.startswith(p) for name in taken))
    roi = numpy_helper.from_array(np.zeros(0, np.float32), f"{prefix}_roi")
    scales = numpy_helper.from_array(np.array([1.0, 1.0, *scale], np.float32), f"{prefix}_scales")
    node = onnx.helper.make_node("Resize", [source, roi.name, scales.name], [f"{prefix}_output"], name=prefix,
                                 mode="linear", coordinate_transformation_mode="half_pixel")
    return node, [roi, scales]


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
