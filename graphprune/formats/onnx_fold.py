"""Constant subgraphs folded into initializers before conversion.

Some files make their weights at run time from constants: onnx's own ``light_*`` models fill every
weight with ``ConstantOfShape`` from a shape initializer, and exporters leave ``Constant -> Cast ->
Reshape`` chains. onnx2torch reads conv and norm weights only from initializers, so every node
whose inputs are all constant (and whose result is deterministic and of a known, bounded size) is
evaluated once, by onnxruntime itself, and its outputs become initializers: the folded weights are
the values onnxruntime computes for the input file. onnxsim folds these too, but it gives up on a
whole graph it cannot check (an IR-3 file whose initializers were removed from the inputs), and it
may be absent; this step needs neither.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper

MAX_FOLDED_ELEMENTS = 2**26  # per tensor: a file can ask ConstantOfShape for more than any machine holds
_NOT_FOLDED = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",  # quantised weights stay quantised
    "If", "Loop", "Scan",
})


def fold_constants(proto: onnx.ModelProto) -> int:
    """Fold, in place, every constant node (see the module docstring); returns how many went."""
    constants = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    candidates = []
    for node in proto.graph.node:
        if (node.domain in ("", "ai.onnx") and node.op_type not in _NOT_FOLDED
                and all(not name or name in constants for name in node.input)
                and not any(name in outputs for name in node.output)):
            candidates.append(node)
            constants.update(node.output)
    if not candidates:
        return 0
    types = _inferred_types(proto)
    foldable, folded_names = [], {t.name for t in proto.graph.initializer}
    for node in candidates:  # in graph order, so a node's inputs are decided before it
        if all(not n or n in folded_names for n in node.input) and all(_bounded(types.get(o)) for o in node.output):
            foldable.append(node)
            folded_names.update(node.output)
    if not foldable:
        return 0
    folded = {id(n) for n in foldable}
    rest = [n for n in proto.graph.node if id(n) not in folded]
    read_by_rest = {name for node in rest for name in node.input}
    needed = [o for n in foldable for o in n.output if o in read_by_rest]
    values = _evaluate(proto, foldable, needed, types)
    if values is None:
        return 0
    del proto.graph.node[:]
    proto.graph.node.extend(rest)
    for name, value in zip(needed, values):
        proto.graph.initializer.append(numpy_helper.from_array(value, name))
    _drop_unused_initializers(proto, {n for node in foldable for n in node.input})
    return len(foldable)


def _inferred_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        return {}
    return {v.name: v.type for v in inferred.graph.value_info}


def _bounded(value_type: onnx.TypeProto | None) -> bool:
    """A tensor type with an element type and a static shape of at most MAX_FOLDED_ELEMENTS."""
    if value_type is None or not value_type.HasField("tensor_type"):
        return False
    tensor = value_type.tensor_type
    if not tensor.elem_type or not tensor.HasField("shape"):
        return False
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return all(d >= 0 for d in dims) and math.prod(dims) <= MAX_FOLDED_ELEMENTS


def _evaluate(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], names: list[str],
              types: dict[str, onnx.TypeProto]) -> list | None:
    """The values of ``names`` computed by onnxruntime from the constant ``nodes``."""
    if not names:
        return []
    import onnxruntime as ort

    read = {n for node in nodes for n in node.input}
    graph = helper.make_graph(
        nodes, "constants", [],
        [helper.make_value_info(name, types[name]) for name in names],
        initializer=[t for t in proto.graph.initializer if t.name in read])
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = max(proto.ir_version, 4)  # initializers need not be inputs since IR 4
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(names, {})
    except Exception:
        return None  # left to onnxsim, and to the converter's one-line error


def _drop_unused_initializers(proto: onnx.ModelProto, candidates: set[str]) -> None:
    """Initializers among ``candidates`` (the folded nodes' inputs) that nothing reads any more."""
    used = {n for node in proto.graph.node for n in node.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used or t.name not in candidates]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
