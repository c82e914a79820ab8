"""Layer units: what a network without residual blocks can drop (VGG, PP-LCNet).

A *layer unit* starts at a weighted op ``w`` (conv, linear) that reads one computed tensor, the
*entry*, and takes in what follows it up to the next weighted op: while the value so far has an
immediate post-dominator ``p`` (every path from it to the output passes ``p``) such that the nodes
between them are few (at most ``MAX_TAIL_NODES``), carry no weights, keep the entry's shape, read
only from that span and are read only within it, ``p`` joins the unit (a norm, an activation, a
hard-swish written as ``x * clip(x + 3, 0, 6) / 6``; not a pooling). The last value is the unit's
*exit*. It is a unit where

1. every value in it has the entry's shape (a stride-1, channel-keeping layer), so that the exit's
   readers can read the entry instead: dropping a unit is the identity in its place, and the
   adaptors fitted around the gap (PRACTISE) recover what they can;
2. the entry is no graph input and the exit no graph output, and ``w`` is not the network's only
   weighted op.

:func:`graphprune.passes.find_blocks.find_blocks` returns the units of a network with no residual
block (it has nothing else to drop); in a residual network only those outside every block, and only
where asked (``layers``; :mod:`.add_layers` asks where the blocks cannot reach the target): inside
a residual branch a layer is part of its block.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from ..ops import is_multi_output, is_weighted

MAX_TAIL_NODES = 8  # a longer weight-free span is a computation of its own, not a layer's tail


def layer_units(gm: fx.GraphModule, graph: nx.DiGraph, constants: set[fx.Node], shapes: dict[str, tuple],
                root, order: dict[fx.Node, int]) -> list[tuple[fx.Node, list[fx.Node], fx.Node]]:
    """(entry, nodes, exit) of every layer unit of ``gm`` in graph order (module docstring);
    ``graph``: the dataflow graph without constants, ``root`` its virtual source; ``shapes``:
    output shapes by node name; ``order``: each node's position in the graph."""
    output = gm.graph.output_node()
    if output not in graph:
        return []
    weighted = [n for n in gm.graph.nodes if n in graph and n is not root and is_weighted(n, gm, constants)]
    if len(weighted) < 2:
        return []
    ipdom = nx.immediate_dominators(graph.reverse(copy=False), output)
    units = []
    for w in weighted:
        inputs = [i for i in w.all_input_nodes if i not in constants]
        if len(inputs) != 1 or inputs[0].op == "placeholder" or is_multi_output(inputs[0]):
            continue
        entry = inputs[0]
        shape = shapes.get(entry.name)
        nodes, exit_node = [w], w
        while True:
            span = _tail_span(exit_node, ipdom.get(exit_node), graph, gm, constants, order)
            if span is None or any(shapes.get(n.name) != shape for n in span):
                break  # a pooling after the layer is the next layer's business
            nodes += span
            exit_node = span[-1]
        if shape is None or shapes.get(w.name) != shape or output in exit_node.users:
            continue
        units.append((entry, nodes, exit_node))
    return units


def _tail_span(start: fx.Node, end, graph: nx.DiGraph, gm: fx.GraphModule, constants, order) -> list[fx.Node] | None:
    """The nodes after ``start`` up to ``end`` (its immediate post-dominator), in graph order,
    where they can join ``start``'s unit: few, weight-free, single-entry single-exit; else None."""
    if end is None or end is start or end.op == "output" or is_weighted(end, gm, constants):
        return None
    between = (nx.descendants(graph, start) & nx.ancestors(graph, end)) | {end}
    if len(between) > MAX_TAIL_NODES or any(is_weighted(n, gm, constants) for n in between):
        return None
    inside = between | {start}
    for node in between:
        if any(p not in inside for p in graph.predecessors(node)):
            return None
        if node is not end and any(s not in inside for s in graph.successors(node)):
            return None
    return sorted(between, key=order.get)
