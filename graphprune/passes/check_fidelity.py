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

Where the written model keeps little of the original's function there (``poor_fidelity``: top-1
agreement under MIN_AGREEMENT, or for a class per position the images that read the original's
CTC text; mAP50 against the original's detections, either way, under MIN_MAP50; a map's IoU with
the original's under MIN_MAP_IOU; any other output's relative error over MAX_RELATIVE_ERROR), the
record holds a warning the summary prints: the run met its latency target with a model a user
should not ship as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraphpruneError
from ..detections import lower_map50
from ..model import Model
from .base import Analysis, PassResult
from .quantize_result import QuantizedOnnx
from .recover import RecoveryLog


# Far past what a user would accept, so that a warning means "this is broken", not "this lost a
# little": nudenet's YOLOv8n with 4 of its 6 C2f blocks dropped ranked the original's detections at
# mAP50 0.15 on 800 photos; EfficientNet-Lite0 at a 22% cut (5.9 points of top-1 lost) agreed with
# the original on 85.5% of them.
MIN_AGREEMENT = 0.7
MIN_MAP50 = 0.5
MIN_MAP_IOU = 0.5  # half the region the original marks, as for detections
MAX_RELATIVE_ERROR = 0.5


def poor_fidelity(result: dict) -> str | None:
    """What shows that the written model keeps little of the original's function (``evaluate``'s
    dict against the original), or None."""
    found = []
    for name, output in result.get("outputs", {}).items():
        detections = output.get("detections") or {}
        lowest = lower_map50(detections)
        text = (output.get("ctc") or {}).get("text_agreement")  # what a recogniser's user reads
        if text is not None:
            if text < MIN_AGREEMENT:
                found.append(f"'{name}' reads the original's text (CTC) on {100 * text:.0f}% of images")
        elif output.get("agreement") is not None and output["agreement"] < MIN_AGREEMENT:
            found.append(f"'{name}' agrees with the original's top class on {100 * output['agreement']:.0f}%")
        elif lowest is not None and lowest < MIN_MAP50:
            found.append(f"'{name}' ranks the original's detections at mAP50 {lowest:.2f}")
        elif output.get("map_iou") is not None and output["map_iou"] < MIN_MAP_IOU:
            found.append(f"'{name}' marks regions at IoU {output['map_iou']:.2f} with the original's")
        elif ("agreement" not in output and not detections and "map_iou" not in output
              and (output.get("relative_error") or 0) > MAX_RELATIVE_ERROR):
            found.append(f"'{name}' is {output['relative_error']:.2f} off the original's (relative error)")
    return "; ".join(found) or None


@dataclass(frozen=True)
class HeldOutFidelity:
    """Artefact: ``evaluate``'s dict for the written model against the original on the held-out
    images (``None`` with the ``error`` where the outputs could not be compared)."""

    result: dict | None
    images: int
    trained_on: bool
    error: str | None = None

    @property
    def warning(self) -> str | None:
        return poor_fidelity(self.result) if self.result is not None else None

    def to_dict(self) -> dict:
        return {"images": self.images, "trained_on_by_recovery": self.trained_on, "result": self.result,
                "error": self.error, "warning": self.warning}


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
