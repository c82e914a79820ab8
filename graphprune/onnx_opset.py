"""Bringing an ONNX graph to an opset onnx2torch converts, and the written graph back.

onnx2torch has converters for each op's forms up to about opset 17. Files from before opset 11
are upgraded with onnx's version converter. Newer files, which is what torch's dynamo exporter
writes by default (opset 18-20), are brought *down* node by node, and only where the node means
the same at the lower opset:

* the op's schema at the target opset has the same inputs (by name, in order, as many as the node
  uses) and declares every attribute the node sets: the node stays as it is. This covers new
  versions that only add element types or optional inputs the node leaves out (Flatten-21,
  Reshape-19/21, Pad-18+ without ``axes``, Relu, Conv, Gemm ...);
* the Reduce ops that take ``axes`` as an input since opset 18 get it back as the ``axes``
  attribute when that input is a constant.

Anything else leaves the op unsupported and the caller reports it. The lowered graph must pass
``onnx.checker`` with shape inference, and ``io_onnx.load_proto`` also verifies the converted fx
graph against onnxruntime running the graph at its *own* opset, so a node whose meaning changed
in a way the schema does not show (a new attribute *value*) is caught there. When graphprune
writes such a model, :func:`restore_opset` converts it back up to the input's opset.
"""

from __future__ import annotations

import copy
from typing import Callable

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
                       ) -> onnx.ModelProto | None:
    """A copy of ``proto`` at an opset where ``unsupported(copy)`` is empty, or None."""
    opset = default_opset(proto)
    if opset < UPGRADE_OPSET:
        candidates = [_upgrade(proto, UPGRADE_OPSET)]
    else:
        candidates = [_downgrade(proto, target) for target in CONVERTER_OPSETS if target < opset]
    for candidate in candidates:
        if candidate is not None and not unsupported(candidate):
            return candidate
    return None


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


def _downgrade(proto: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    opset = default_opset(proto)
    constants = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        lowered = _downgrade_node(node, opset, target, constants)
        if lowered is None:
            return None
        nodes.append(lowered)
    out = copy.deepcopy(proto)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
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
    return node if _same_signature(node, new, old) else None


def _same_signature(node: onnx.NodeProto, new: defs.OpSchema, old: defs.OpSchema) -> bool:
    """The node's inputs, outputs and attributes mean the same under ``old`` as under ``new``."""
    variadic = defs.OpSchema.FormalParameterOption.Variadic
    for used, new_formals, old_formals in ((node.input, new.inputs, old.inputs), (node.output, new.outputs, old.outputs)):
        if len(used) > len(old_formals) and not (old_formals and old_formals[-1].option == variadic):
            return False
        for i in range(min(len(used), len(old_formals), len(new_formals))):
            if new_formals[i].name != old_formals[i].name:
                return False
        required = [f for f in old_formals if f.option == defs.OpSchema.FormalParameterOption.Single]
        if len(used) < len(required):
            return False
    return all(attribute.name in old.attributes for attribute in node.attribute)


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
