"""graphprune's passes. Each module holds one pass; :mod:`.base` holds the infrastructure."""

from .base import Analysis, Pass, PassResult, PassState, Pipeline, Step, Transform, available_passes, run_step
from .drop_blocks import DropBlocks, drop_blocks, zero_branch
from .find_blocks import Block, FindBlocks, find_blocks
from .measure_latency import (BlockLatency, BlockLatencyTable, CutMeasurement, MeasureBlockLatency,
                              measure_block_latency, measure_cut)


def builtin_passes() -> dict[str, type[Pass]]:
    return {cls.name: cls for cls in (FindBlocks, DropBlocks, MeasureBlockLatency)}


__all__ = [
    "Analysis", "Block", "DropBlocks", "FindBlocks", "Pass", "PassResult", "PassState", "Pipeline",
    "Step", "Transform", "available_passes", "builtin_passes", "drop_blocks", "find_blocks",
    "run_step", "zero_branch",
    "BlockLatency", "BlockLatencyTable", "CutMeasurement", "MeasureBlockLatency", "measure_block_latency",
    "measure_cut",
]
