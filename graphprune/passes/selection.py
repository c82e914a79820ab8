"""The artefacts of block selection: each block's score, and the chosen set with its measured cut.

They live apart from the passes that make them (:mod:`.select_blocks`, :mod:`.refine_selection`)
because the passes that read them (:mod:`.drop_blocks`, the report) must not import the selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backends.base import CutMeasurement


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
