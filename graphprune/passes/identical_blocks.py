"""Analysis helper: which blocks compute the same thing (the runtime runs the same kernels on the
same shapes for either).

Two blocks are *identical* when their nodes, in order, have the same op kind, output shape, input
shapes, non-tensor arguments (stride, padding, ...) and module configuration and parameter shapes
(:func:`block_signature`). :mod:`.pool_latency` pools their measured savings; :mod:`.measure_latency`
measures one of each group first when time is short.
"""

from __future__ import annotations

from torch import fx

from ..graph_stats import node_stats
from ..model import Model
from ..ops import op_kind
from .find_blocks import Block


def block_signature(gm: fx.GraphModule, block: Block, shapes: dict) -> tuple:
    """What the runtime executes for ``block``, node by node, without the node names."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = list(block.branch) + list(block.shortcut) + [block.merge]
    if block.exit != block.merge:
        names.append(block.exit)
    signature = [block.kind, tuple(block.input_shape or ()), tuple(block.output_shape or ())]
    for name in names:
        node = nodes[name]
        inputs = tuple(_shape(shapes, i.name) for i in node.all_input_nodes)
        constants = tuple(repr(a) for a in node.args if not isinstance(a, fx.Node))
        module = ""
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            module = (type(sub).__name__, sub.extra_repr(),
                      tuple(tuple(t.shape) for t in list(sub.parameters()) + list(sub.buffers())))
        signature.append((op_kind(node, gm), _shape(shapes, name), inputs, constants, module))
    return tuple(signature)


def identical_groups(model: Model, blocks: list[Block]) -> list[list[str]]:
    """Groups of two or more identical blocks (block names in graph order)."""
    shapes = {name: s.shape for name, s in node_stats(model).items()}
    by_signature: dict[tuple, list[str]] = {}
    for block in blocks:
        by_signature.setdefault(block_signature(model.graph_module, block, shapes), []).append(block.name)
    return [names for names in by_signature.values() if len(names) > 1]


def _shape(shapes: dict, name: str):
    shape = shapes.get(name)
    return tuple(shape) if shape is not None else None
