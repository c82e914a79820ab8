"""Analysis: how close the written model stays to the original on the tiny set's held-out images.

    check_fidelity: evaluate(written, ctx.holdout without labels, reference=ctx.original)

The held-out images (``ctx.holdout``: 20% of the tiny set, at least 16) are the only images every
run has that scoring never fitted on; recovery trains on them too unless it stops early on them
(images above 64 px: :class:`~.recover.RecoveryLog` ``trained_on_holdout``), and the record says
which. Labels are dropped: the comparison is with the original's outputs (:mod:`graphprune.evaluate`:
top-1 agreement for class scores, confident detections kept and added for a YOLOv8 head, each
output's relative error), so it works for any model and needs no ``--eval-data``. It is the signal
a user gets without an evaluation set: a detector whose optimised form keeps few of the original's
detections says so here, whatever its output's relative error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraphpruneError
from ..model import Model
from .base import Analysis, PassResult
from .plan_quantization import QuantizedOnnx
from .recover import RecoveryLog


@dataclass(frozen=True)
class HeldOutFidelity:
    """Artefact: ``evaluate``'s dict for the written model against the original on the held-out
    images (``None`` with the ``error`` where the outputs could not be compared)."""

    result: dict | None
    images: int
    trained_on: bool
    error: str | None = None

    def to_dict(self) -> dict:
        return {"images": self.images, "trained_on_by_recovery": self.trained_on, "result": self.result,
                "error": self.error}


class CheckFidelity(Analysis):
    """The written model (the int8 file where a step made one) against ``ctx.original`` on
    ``ctx.holdout``, labels dropped."""

    name = "check_fidelity"
    optional = (QuantizedOnnx, RecoveryLog)
    provides = (HeldOutFidelity,)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        from ..evaluate import evaluate_written

        holdout = ctx.need("holdout", self.name)
        unlabelled = holdout.without_labels()
        recovery, quantized = inputs.get(RecoveryLog), inputs.get(QuantizedOnnx)
        trained_on = bool(recovery is not None and recovery.trained_on_holdout)
        try:
            result = evaluate_written(model, quantized.proto if quantized is not None else None, unlabelled,
                                      ctx.original)
            fidelity = HeldOutFidelity(result, len(holdout), trained_on)
        except GraphpruneError as exc:  # a report without this check beats no result after the whole run
            fidelity = HeldOutFidelity(None, len(holdout), trained_on, str(exc))
        return PassResult(model, record=fidelity.to_dict(), artifacts=[fidelity])
