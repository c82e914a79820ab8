"""Analysis: blocks that compute the same thing save the same time; pool their measured savings.

Two blocks are *identical* when their nodes, in order, have the same op kind, output shape, input
shapes, non-tensor arguments (stride, padding, ...) and module configuration and parameter shapes
(:func:`block_signature`): the runtime executes the same kernels on the same shapes for either, so
the time dropping one saves differs from the other's only by measurement noise. That noise is not
small next to what separates blocks: on ResNet-56 (onnxruntime, CPU, 1 thread, batch 1) the eight
identical inner blocks of one stage measured single-block savings from 3.3% to 4.3%, about as far
apart as the stages themselves, and a recoverability / saving score then ranks identical blocks by
timing luck. So every block of a group of identical blocks gets the group's median saving:

    pooled_saved_fraction(b) = median { saved_fraction(c) : signature(c) = signature(b) }

(the median, not the mean, so one measurement disturbed by other load does not move the group).
A block with no twin keeps its own measurement. Combined sets are still measured as a whole by
:mod:`.select_blocks`; only the ranking and the predicted cut use the pooled figures.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from torch import fx

from ..graph_stats import node_stats
from ..model import Model
from ..ops import op_kind
from .base import Analysis, PassResult
from .find_blocks import Block, Blocks, blocks_of
from .measure_latency import BlockLatencyTable


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


@dataclass
class PooledLatency(BlockLatencyTable):
    """Artefact: a block latency table whose identical blocks share their group's median saving
    (``pooled_groups`` lists the groups)."""


def pool_savings(table: BlockLatencyTable, groups: list[list[str]]) -> PooledLatency:
    """``table`` with every grouped block's saving replaced by its group's median (see above)."""
    rows = {row.name: row for row in table.rows}
    pooled = dict(rows)
    for names in groups:
        members = [rows[n] for n in names if n in rows]
        if len(members) < 2:
            continue
        fraction = statistics.median(r.saved_fraction for r in members)
        saved_ms = statistics.median(r.saved_ms for r in members)
        for row in members:
            pooled[row.name] = replace(row, saved_fraction=fraction, saved_ms=saved_ms)
    return PooledLatency(table.original, [pooled[row.name] for row in table.rows], table.settings,
                             table.backend_info, [list(names) for names in groups])


def _shape(shapes: dict, name: str):
    shape = shapes.get(name)
    return tuple(shape) if shape is not None else None


class PoolIdenticalBlocks(Analysis):
    """Provides ``PooledLatency``: the block latency table with identical blocks' savings pooled."""

    name = "pool_identical_blocks"
    requires = (BlockLatencyTable,)
    optional = (Blocks,)
    provides = (PooledLatency,)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        blocks = blocks_of(model, inputs)
        table: BlockLatencyTable = inputs[BlockLatencyTable]
        groups = identical_groups(model, blocks)
        pooled = pool_savings(table, groups)
        measured = table.saved_fractions()
        record = {"groups": [{"blocks": names, "measured": [measured.get(n) for n in names],
                              "pooled": pooled.saved_fractions().get(names[0])} for names in groups]}
        return PassResult(model, record=record, artifacts=[pooled])
