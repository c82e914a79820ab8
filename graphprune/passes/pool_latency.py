"""Analysis: blocks that compute the same thing save the same time; pool their measured savings.

Two blocks are *identical* when their nodes, in order, have the same op kind, output shape, input
shapes, non-tensor arguments (stride, padding, ...) and module configuration and parameter shapes
(:func:`.identical_blocks.block_signature`): the runtime executes the same kernels on the same
shapes for either, so the time dropping one saves differs from the other's only by measurement noise. That noise is not
small next to what separates blocks: on ResNet-56 (onnxruntime, CPU, 1 thread, batch 1) the eight
identical inner blocks of one stage measured single-block savings from 3.3% to 4.3%, about as far
apart as the stages themselves, and a recoverability / saving score then ranks identical blocks by
timing luck. So every block of a group of identical blocks gets the group's median saving:

    pooled_saved_fraction(b) = median { saved_fraction(c) : signature(c) = signature(b) }

(the median, not the mean, so one measurement disturbed by other load does not move the group).
A block with no twin keeps its own measurement; a twin that profiling left unmeasured (time
budget: ``BlockLatencyTable.unmeasured``) takes no part in its group's median. Combined sets are
still measured as a whole by :mod:`.select_blocks`; only the ranking and the predicted cut use the
pooled figures.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from ..model import Model
from .base import Analysis, PassResult
from .find_blocks import Blocks, blocks_of
from .identical_blocks import identical_groups
from .measure_latency import BlockLatencyTable


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
        measured = [row for row in members if row.name not in table.unmeasured]
        if len(members) < 2 or not measured:
            continue
        fraction = statistics.median(r.saved_fraction for r in measured)
        saved_ms = statistics.median(r.saved_ms for r in measured)
        for row in members:
            pooled[row.name] = replace(row, saved_fraction=fraction, saved_ms=saved_ms)
    return PooledLatency(table.original, [pooled[row.name] for row in table.rows], table.settings,
                         table.backend_info, [list(names) for names in groups], table.from_cache,
                         list(table.unmeasured))


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
        measured = {n: f for n, f in table.saved_fractions().items() if n not in table.unmeasured}
        record = {"groups": [{"blocks": names, "measured": [measured.get(n) for n in names],
                              "pooled": pooled.saved_fractions().get(names[0])} for names in groups]}
        return PassResult(model, record=record, artifacts=[pooled])
