"""Bringing an ONNX graph to an opset onnx2torch converts, and the written graph back.

onnx2torch has converters for each op's forms up to about opset 17. An older file with ops it
cannot convert is upgraded to opset 13 with onnx's version converter. Newer files, which is what torch's dynamo exporter
writes by default (opset 18-20), are brought *down* node by node, and only where the node means
the same at the lower opset:

* the op's schema at the target opset has the same inputs (by name, in order, as many as the node
  uses) and declares every attribute the node sets: the node stays as it is. This covers new
  versions that only add element types or optional inputs the node leaves out (Flatten-21,
  Reshape-19/21, Pad-18+ without ``axes``, Relu, Conv, Gemm ...);
* attributes a newer version added, set to the value they have when left out (the dynamo
  exporter writes Resize-18's ``antialias=0``), are not counted as set;
* the Reduce ops that take ``axes`` as an input since opset 18 get it back as the ``axes``
  attribute when that input is a constant; Split-18's ``num_outputs`` becomes Split-13's sizes
  input where shape inference knows the split axis's size.

An op onnx2torch has no converter for at any version but which ONNX defines as a function of
other ops (Gelu, new in opset 20) is first replaced by that function's nodes
(:func:`expand_functions`).

Anything else leaves the op unsupported and the caller reports it. The lowered graph must pass
``onnx.checker`` with shape inference, and ``io_onnx.load_proto`` also verifies the converted fx
graph against onnxruntime running the graph at its *own* opset, so a node whose meaning changed
in a way the schema does not show (a new attribute *value*) is caught there. When graphprune
writes such a model, :func:`restore_opset` converts it back up to the input's opset.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper

CONVERTER_OPSETS = (17, 13)  # tried in this order when a file's opset is newer than its converters
UPGRADE_OPSET = 13
REDUCE_AXES_INPUT_SINCE = 18
REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"}  # ReduceSum took axes as an input already at opset 13


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def to_converter_opset(proto: onnx.ModelProto, unsupported: Callable[[onnx.ModelProto], list[str]]
                       ) -> tuple[onnx.ModelProto | None, list[str]]:
    """A copy of ``proto`` at an opset where ``unsupported(copy)`` is empty, or None and what stood
    in the way of the first opset tried: the ops with no form there, else the ops it still cannot
    convert (empty where onnx's checker refused the result)."""
    opset = default_opset(proto)
    blockers: list[str] | None = None
    targets = (UPGRADE_OPSET,) if opset < UPGRADE_OPSET else [t for t in CONVERTER_OPSETS if t < opset]
    for target in targets:
        blocked: list[str] = []
        candidate = _upgrade(proto, target) if opset < UPGRADE_OPSET else _downgrade(proto, target, blocked)
        missing = unsupported(candidate) if candidate is not None else blocked
        if candidate is not None and not missing:
            return candidate, []
        blockers = missing if blockers is None else blockers
    return None, blockers or []


def expand_functions(proto: onnx.ModelProto) -> int:
    """Replace, in place, every node of an op onnx2torch has no converter for at all (Gelu, new in
    opset 20) by the ONNX function that defines it, when the op's schema has one; the new nodes
    keep the node's name as a prefix, so its module path (and block name) survives. Returns how
    many nodes were expanded."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    convertible = {(d.domain, d.operation_type) for d in _CONVERTER_REGISTRY}
    opset = default_opset(proto)
    types: dict[str, onnx.TypeProto] | None = None  # inferred once, and only if some node needs them
    nodes, expanded = [], 0
    for index, node in enumerate(proto.graph.node):
        body = None
        if node.domain in ("", "ai.onnx") and ("", node.op_type) not in convertible:
            if types is None:
                types = _value_types(proto)
            body = _function_body(node, opset, types)
        if body is None:
            nodes.append(node)
            continue
        nodes.extend(_inline(node, body, node.name or f"{node.op_type}_{index}"))
        expanded += 1
    if expanded:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        _castlike_to_cast(proto)
    return expanded


def _castlike_to_cast(proto: onnx.ModelProto) -> None:
    """Function bodies cast their constants with CastLike (no converter); the type it copies is
    known once shapes are inferred, so it becomes a plain Cast."""
    types = _value_types(proto)
    for node in proto.graph.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and node.input[1] in types:
            target = types[node.input[1]].tensor_type.elem_type
            if not target:
                continue
            node.op_type = "Cast"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("to", target))


def _function_body(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    try:
        schema = defs.get_schema(node.op_type, max_inclusive_version=opset)
    except (defs.SchemaError, RuntimeError):
        return None
    if schema.has_function:
        return schema.function_body
    if not schema.has_context_dependent_function:
        return None
    if any(name and name not in types for name in node.input):
        return None  # the function may depend on an input type that inference could not give
    try:
        body = schema.get_context_dependent_function(
            node.SerializeToString(), [types[name].SerializeToString() for name in node.input if name])
    except Exception:
        return None
    function = onnx.FunctionProto()
    function.ParseFromString(body)
    return function


def _value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    graph = inferred.graph
    types = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: helper.make_tensor_type_proto(t.data_type, None) for t in graph.initializer})
    return types


def _inline(node: onnx.NodeProto, function: onnx.FunctionProto, prefix: str) -> list[onnx.NodeProto]:
    """``function``'s nodes with its formal inputs/outputs bound to ``node``'s and its inner values
    and attribute references made concrete."""
    names = dict(zip(function.input, node.input))
    names.update(zip(function.output, node.output))
    attributes = {a.name: a for a in node.attribute}
    inlined = []
    for i, inner in enumerate(function.node):
        new = copy.deepcopy(inner)
        new.name = f"{prefix}/{i}_{inner.op_type}"
        new.metadata_props.extend(node.metadata_props)  # the exporter's module scope, if any
        for slot, name in enumerate(new.input):
            new.input[slot] = names.get(name, f"{prefix}/{name}" if name else "")
        for slot, name in enumerate(new.output):
            new.output[slot] = names.setdefault(name, f"{prefix}/{name}")
        resolved = []
        for attribute in new.attribute:
            if attribute.ref_attr_name:
                if attribute.ref_attr_name not in attributes:
                    continue  # not set on the node: the inner op's default applies
                value = copy.deepcopy(attributes[attribute.ref_attr_name])
                value.name = attribute.name
                attribute = value
            resolved.append(attribute)
        del new.attribute[:]
        new.attribute.extend(resolved)
        inlined.append(new)
    return inlined


def restore_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``proto`` converted up to ``opset`` (the input file's), or unchanged if onnx cannot."""
    if default_opset(proto) >= opset:
        return proto
    return _upgrade(proto, opset) or proto


def _upgrade(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    try:
        upgraded = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(upgraded)
        return upgraded
    except Exception:
        return None


def _downgrade(proto: onnx.ModelProto, target: int, blocked: list[str]) -> onnx.ModelProto | None:
    """``proto`` at opset ``target`` node by node (module docstring), or None; ``blocked`` gets the
    ops that have no form there."""
    opset = default_opset(proto)
    constants = {t.name: t for t in proto.graph.initializer}
    nodes, added = [], []
    types: dict[str, onnx.TypeProto] | None = None  # inferred once, and only if a Split needs them
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        lowered = _downgrade_node(node, opset, target, constants)
        if lowered is None and node.op_type == "Split":
            types = _value_types(proto) if types is None else types
            lowered = _split_sizes_as_input(node, types, added)
        if lowered is None:
            blocked.append(f"{node.op_type}-{opset}")
            continue
        nodes.append(lowered)
    if blocked:
        blocked[:] = sorted(set(blocked))
        return None
    out = copy.deepcopy(proto)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(added)
    for entry in out.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception:
        return None
    return out


def _downgrade_node(node: onnx.NodeProto, opset: int, target: int, constants: dict) -> onnx.NodeProto | None:
    try:
        new = defs.get_schema(node.op_type, max_inclusive_version=opset)
        old = defs.get_schema(node.op_type, max_inclusive_version=target)
    except (defs.SchemaError, RuntimeError):
        return None  # an op that did not exist yet at the target opset
    if new.since_version == old.since_version:
        return node
    if node.op_type in REDUCE_OPS and new.since_version >= REDUCE_AXES_INPUT_SINCE > old.since_version:
        return _axes_input_to_attribute(node, constants)
    if not _same_signature(node, new, old):
        return None
    unknown = [a for a in node.attribute if a.name not in old.attributes]  # each at its default (_is_default)
    if not unknown:
        return node
    lowered = copy.deepcopy(node)
    del lowered.attribute[:]
    lowered.attribute.extend(a for a in node.attribute if a.name in old.attributes)
    return lowered


def _same_signature(node: onnx.NodeProto, new: defs.OpSchema, old: defs.OpSchema) -> bool:
    """The node's inputs, outputs and attributes mean the same under ``old`` as under ``new``."""
    variadic = defs.OpSchema.FormalParameterOption.Variadic
    pairs = ((node.input, new.inputs, old.inputs), (node.output, new.outputs, old.outputs))
    for used, new_formals, old_formals in pairs:
        if len(used) > len(old_formals) and not (old_formals and old_formals[-1].option == variadic):
            return False
        for i in range(min(len(used), len(old_formals), len(new_formals))):
            if new_formals[i].name != old_formals[i].name:
                return False
        required = [f for f in old_formals if f.option == defs.OpSchema.FormalParameterOption.Single]
        if len(used) < len(required):
            return False
    return all(attribute.name in old.attributes or _is_default(attribute, new) for attribute in node.attribute)


def _is_default(attribute: onnx.AttributeProto, schema: defs.OpSchema) -> bool:
    """``attribute`` set to the value it has when left out (the dynamo exporter writes Resize-18's
    ``antialias=0`` and ``keep_aspect_ratio_policy='stretch'``): the node means the same without it."""
    formal = schema.attributes.get(attribute.name)
    if formal is None or not formal.default_value.name:
        return False
    return helper.get_attribute_value(attribute) == helper.get_attribute_value(formal.default_value)


def _split_sizes_as_input(node: onnx.NodeProto, types: dict[str, onnx.TypeProto], added: list) -> onnx.NodeProto | None:
    """Split-18's ``num_outputs`` as the sizes input that Split-13 takes, where the split axis's
    size is known: ceil(size / n) each, the last what is left (Split-18's rule)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    count = attributes.pop("num_outputs", None)
    if count is None or len(node.input) > 1 and node.input[1]:
        return None
    shape = types.get(node.input[0])
    dims = list(shape.tensor_type.shape.dim) if shape is not None and shape.tensor_type.HasField("shape") else []
    axis = int(attributes.get("axis", 0))
    if not dims or not -len(dims) <= axis < len(dims) or not dims[axis].HasField("dim_value"):
        return None
    size = dims[axis].dim_value
    each = -(-size // count)
    sizes = [each] * (count - 1) + [size - each * (count - 1)]
    if min(sizes) < 0:
        return None
    name = f"{node.output[0]}__split_sizes"
    added.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
    return helper.make_node("Split", [node.input[0], name], list(node.output), name=node.name, **attributes)


def _axes_input_to_attribute(node: onnx.NodeProto, constants: dict) -> onnx.NodeProto | None:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.pop("noop_with_empty_axes", 0):
        return None  # "no axes: identity" has no form before opset 18
    axes_name = node.input[1] if len(node.input) > 1 else ""
    if axes_name:
        if axes_name not in constants:
            return None  # axes computed at run time
        axes = [int(a) for a in numpy_helper.to_array(constants[axes_name]).reshape(-1)]
        if axes:  # an empty list reduces over every axis, as no attribute does
            attributes["axes"] = axes
    return helper.make_node(node.op_type, [node.input[0]], list(node.output), name=node.name, **attributes)
