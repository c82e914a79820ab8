"""graphprune's passes. Each module holds one pass; :mod:`.base` holds the contracts,
:mod:`.context` what passes share, :mod:`.pipeline` the runner and its instruments."""

from .add_layers import AddLayers
from .base import Analysis, Artifacts, Pass, PassResult, Transform, available_passes
from .check_fidelity import CheckFidelity, HeldOutFidelity
from .check_reachable import CheckReachable
from .choose_resolution import ChooseResolution
from .context import PassContext
from .drop_blocks import DropBlocks, drop_blocks, zero_branch
from .find_blocks import Block, Blocks, FindBlocks, find_blocks
from .measure_latency import (BlockLatency, BlockLatencyTable, CutMeasurement, FinalCut, MeasureBlockLatency,
                              MeasureResult, measure_block_latency, measure_cut)
from .plan_quantization import Measuring, PlanQuantization, measuring_backend
from .quantize_result import QuantizedOnnx, QuantizeResult
from .pipeline import Instrument, PassState, Pipeline, Step, default_instruments, run_step
from .pool_latency import PooledLatency, PoolIdenticalBlocks
from .quantize_plan import QuantizationPlan
from .recover import Recover, RecoveryLog
from .recoverability import BlockRecoverabilities, Recoverability
from .refine_selection import RefineSelection, Refinement
from .resize_input import ResizeInput, ResolutionChoice, resize_input
from .select_blocks import SelectBlocks
from .selection import BlockScore, Selection

BUILTIN_PASSES = (FindBlocks, AddLayers, PlanQuantization, MeasureBlockLatency, PoolIdenticalBlocks, CheckReachable, Recoverability,
                  SelectBlocks, RefineSelection, DropBlocks, Recover, QuantizeResult, MeasureResult, CheckFidelity,
                  ChooseResolution, ResizeInput)
ALIASES = {"measure_block_latency": MeasureBlockLatency, "recoverability": Recoverability}  # earlier names


def builtin_passes() -> dict[str, type[Pass]]:
    return {**{cls.name: cls for cls in BUILTIN_PASSES}, **ALIASES}


__all__ = [
    "AddLayers", "Analysis", "Artifacts", "CheckReachable", "Pass", "PassContext", "PassResult", "PassState", "Pipeline", "Step", "Transform",
    "Instrument", "available_passes", "builtin_passes", "default_instruments", "run_step",
    "Block", "BlockLatency", "BlockLatencyTable", "BlockRecoverabilities", "BlockScore", "Blocks", "CutMeasurement",
    "FinalCut", "HeldOutFidelity", "PooledLatency", "QuantizationPlan", "QuantizedOnnx", "Refinement", "RecoveryLog",
    "Selection", "CheckFidelity", "ChooseResolution", "ResizeInput", "ResolutionChoice", "resize_input", "DropBlocks", "FindBlocks", "MeasureBlockLatency", "MeasureResult", "PlanQuantization",
    "PoolIdenticalBlocks",
    "QuantizeResult", "Recover", "Recoverability", "RefineSelection", "SelectBlocks",
    "Measuring", "drop_blocks", "find_blocks", "measure_block_latency", "measure_cut", "measuring_backend",
    "zero_branch",
]
