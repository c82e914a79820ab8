"""Float groups: the roles of the nodes a quantisation leaves in float32, resolved per graph.

A role (``first_conv``, ``classifier``, ``add_concat``, ``decode``) is kept rather than node names so
that it survives block dropping: each graph, as it is quantised, says which of its nodes play it.
onnxruntime's tools exclude nodes by name, so unnamed nodes are named first (:func:`name_nodes`).
"""

from __future__ import annotations

import onnx

from ..errors import GraphpruneError

FLOAT_GROUPS = ("first_conv", "classifier", "add_concat", "decode")


def float_group_nodes(proto: onnx.ModelProto, group: str) -> list[str]:
    """Node names of ``group`` in this graph: the first Conv, the last Gemm/MatMul (classifier),
    every Add/Concat/Sum of two or more computed tensors (residual merges, concatenations), or the
    unweighted nodes between the last weighted ones and the outputs (``decode``: decoding, such as a
    YOLOv8 head's box arithmetic, sigmoid and the Concat of boxes in pixels with class scores in
    [0, 1], where one int8 scale for both rounds every score below 1.3 to 0; a classifier ending in
    its Gemm has none)."""
    nodes = list(proto.graph.node)
    if group == "decode":
        return _tail_nodes(proto)
    if group == "first_conv":
        return [n.name for n in nodes if n.op_type in ("Conv", "ConvTranspose")][:1]
    if group == "classifier":
        return [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    if group == "add_concat":
        constant = {t.name for t in proto.graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
        return [n.name for n in nodes
                if n.op_type in ("Add", "Concat", "Sum") and sum(i not in constant for i in n.input if i) >= 2]
    raise GraphpruneError(f"unknown float group '{group}': use {', '.join(FLOAT_GROUPS)}", parameter="float_groups")


def _tail_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes no Conv/ConvTranspose/Gemm/MatMul is computed from, weighted ones excluded."""
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    feeds_weighted: set[str] = set()  # tensors some weighted node is computed from
    tail = []
    for node in reversed(proto.graph.node):  # ONNX nodes are topologically sorted
        if node.op_type in weighted or any(o in feeds_weighted for o in node.output):
            feeds_weighted.update(i for i in node.input if i)
        else:
            tail.append(node.name)
    return tail[::-1]


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give every unnamed node of ``proto`` a name (op type and position): onnxruntime's tools
    leave nodes in float by name."""
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
