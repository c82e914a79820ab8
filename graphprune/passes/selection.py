"""The artefacts of block selection: each block's score, and the chosen set with its measured cut;
and the goal a selection must measure at (:func:`goal_cut`).

They live apart from the passes that make them (:mod:`.select_blocks`, :mod:`.refine_selection`)
because the passes that read them (:mod:`.drop_blocks`, the report) must not import the selection,
and the goal is read before any selection (:func:`~.plan_quantization.no_block_needed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backends.base import CutMeasurement
from ..errors import GraphpruneError


def check_latency_cut(value: float) -> None:
    """The one rule for a latency target: a fraction strictly between 0 and 1."""
    if not 0 < value < 1:  # also refuses nan
        raise GraphpruneError(f"latency_cut must be between 0 and 1 (exclusive), got {value}", parameter="latency_cut")


def goal_cut(target: float, margin: float) -> float:
    """The measured cut a selection must reach: the target plus the margin, below 1."""
    return min(target + margin, 0.999)


@dataclass(frozen=True)
class BlockScore:
    """score = recoverability / saved_fraction (lower is better; inf where nothing is saved)."""

    name: str
    recoverability: float
    saved_fraction: float
    saved_ms: float
    score: float

    def to_dict(self) -> dict:
        return {"name": self.name, "recoverability": self.recoverability, "saved_fraction": self.saved_fraction,
                "saved_ms": self.saved_ms, "score": None if math.isinf(self.score) else self.score}


@dataclass
class Selection:
    """Artefact: the blocks to drop, in score order, and the cut measured with all of them dropped."""

    blocks: list[str]
    cut: CutMeasurement
    scores: list[BlockScore]
    measurements: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dropped": self.blocks, "measured_cut": self.cut.cut, "measurements": self.measurements,
                "scores": [s.to_dict() for s in self.scores]}
