"""``If`` nodes whose condition is a constant, replaced by the branch they always take.

onnx2torch converts no control flow, so a file holding an ``If`` was refused whole. Where the
condition is an initializer (a flag the exporter baked in, or one that constant folding and
onnxsim computed from static shapes: ``torch.jit.script`` writes ``if x.shape[1] == 3`` as an
``If``), the node always runs the same branch: its nodes go where the ``If`` was, reading the outer
graph's values as the branch did, and ``Identity`` nodes give the branch's outputs the ``If``'s
names, so every reader is unchanged. A branch whose names clash with the outer graph's is left as
it is (and the ``If`` is refused as before); so is every ``If`` whose condition is computed.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


def inline_constant_ifs(proto: onnx.ModelProto) -> int:
    """Inline, in place, every top-level ``If`` with a constant condition; returns how many went."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    nodes, inlined = [], 0
    for node in graph.node:
        branch = _constant_branch(node, initializers)
        names = None if branch is None else _produced(branch)
        if branch is None or names & taken or branch.sparse_initializer:
            nodes.append(node)
            continue
        nodes.extend(branch.node)
        nodes.extend(helper.make_node("Identity", [inner.name], [outer], name=f"{node.name or outer}/taken_branch")
                     for inner, outer in zip(branch.output, node.output))
        graph.initializer.extend(branch.initializer)
        taken |= names
        inlined += 1
    if inlined:
        del graph.node[:]
        graph.node.extend(nodes)
    return inlined


def _constant_branch(node: onnx.NodeProto, initializers: dict) -> onnx.GraphProto | None:
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or node.input[0] not in initializers:
        return None
    condition = numpy_helper.to_array(initializers[node.input[0]])
    if condition.size != 1:
        return None
    wanted = "then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"
    return next((a.g for a in node.attribute if a.name == wanted), None)


def _produced(branch: onnx.GraphProto) -> set[str]:
    """The names a branch defines: its nodes' outputs and its initializers."""
    return {o for n in branch.node for o in n.output if o} | {t.name for t in branch.initializer}
