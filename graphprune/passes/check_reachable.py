"""Analysis: refuse a target no selection can reach before the minutes of scoring, not after.

    reachable  <=>  cut(every candidate block dropped) >= goal = target + margin

A candidate is a block whose own measured saving is positive (what select_blocks ranks). The set of
all of them is measured once, as select_blocks measures its sets (the measuring rule of
:mod:`.plan_quantization`: quantised against the float original where int8 is planned, from the
same resume cache), right after profiling. Where it falls short of the goal the run stops with the
line select_blocks would raise (:func:`~.select_blocks.unreachable`), after one measurement instead
of after scoring every block: PP-OCRv4's detector at a 30% target with int8 (its 6 blocks cut about
4% together) was still scoring blocks after 24 minutes, past its 15-minute --time-budget, when the
run was stopped. Where quantisation alone reaches the goal, or no target is set, there is nothing to check.
Where the network can run at a lower resolution inside the graph, the line says the resolution lever
may reach the target (:func:`~.resize_input.resolution_hint`); where plain layers lie outside the
blocks and the run left them out, how many (:func:`layers_hint`, :mod:`.add_layers`).
"""

from __future__ import annotations

from ..errors import GraphpruneError
from ..model import Model
from .base import Analysis, PassResult
from .find_blocks import Blocks, outside_layers
from .measure_latency import BlockLatencyTable
from .plan_quantization import QuantizationPlan, measuring_backend, no_block_needed
from .pool_latency import PooledLatency
from .resize_input import resolution_hint
from .select_blocks import int8_off_reason, run_set_measurer, scoring_latency, unreachable
from .selection import check_latency_cut, goal_cut


def layers_hint(model: Model, blocks: list, ctx) -> str:
    """Where the run left the layers outside the blocks out (``--layers never``), how many there are."""
    if getattr(ctx.config, "layers", "never") != "never":
        return ""
    layers = outside_layers(model, blocks)
    return f"; the {len(layers)} plain layers outside the blocks may reach it (--layers auto)" if layers else ""


class CheckReachable(Analysis):
    """Measure every candidate block dropped at once; refuse the target in one line where that
    falls short of it (see the module docstring)."""

    name = "check_reachable"
    requires = (Blocks, BlockLatencyTable)
    optional = (PooledLatency, QuantizationPlan)

    def check(self, model: Model, ctx) -> None:
        check_latency_cut(ctx.need("latency_cut", self.name))

    def run(self, model: Model, ctx, inputs) -> PassResult:
        skipped = no_block_needed(ctx, inputs)
        if skipped:
            return PassResult(model, record={"skipped": skipped})
        names = [row.name for row in scoring_latency(inputs).rows if row.saved_fraction > 0]
        measuring = measuring_backend(ctx, inputs, self.name)
        measure = run_set_measurer(measuring, model, inputs[Blocks], ctx)
        target = ctx.need("latency_cut", self.name)
        goal = goal_cut(target, ctx.margin)
        alone = measuring.plan.alone if measuring.plan is not None else None
        cut = measure(names) if names else alone
        best = cut.cut if cut is not None else 0.0
        if best < goal:
            refused = unreachable(target, goal, len(names), best, alone, int8_off_reason(inputs.get(QuantizationPlan)),
                                  blocks_found=len(inputs[Blocks]))
            # lever "auto" has tried resolution itself and says so
            auto = getattr(ctx.config, "lever", None) == "auto"
            refused = f"{refused}{layers_hint(model, inputs[Blocks], ctx)}"
            raise GraphpruneError(refused if auto else f"{refused}{resolution_hint(model)}")
        return PassResult(model, record={"candidates": len(names), "all_dropped_cut": best, "goal": goal})
