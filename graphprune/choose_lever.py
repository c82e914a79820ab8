"""``lever="auto"``: blocks or resolution, whichever keeps the original's outputs closer on held-out images.

    resolution = default_pipeline(lever="resolution")   # seconds: sides timed, nothing trained
    blocks     = default_pipeline(lever="blocks")       # scoring, selection, recovery
    keep the one closer to the original on ctx.holdout

Both runs share one :class:`~graphprune.passes.PassContext`: the same held-out images, the same
deadline, the same caches; the int8 plan, which depends on the original alone, is made once and
given to the blocks run. "Closer" reads :mod:`~graphprune.passes.check_fidelity`'s evaluation of
each written file (the int8 one where a step made it) against the original, labels dropped:

* a classifier: the held-out images on which it keeps the original's top class (what its user's
  top-1 follows), where the two levers differ by ``DECISIVE_IMAGES`` or more; within that,
  resolution. Not the class KL: the blocks lever's held-out figures are flattered (recovery
  fitted the tiny set's other images, and its guard kept the checkpoint best on these), and
  recovery lowers the distributions' distance while the top class drifts, where a resize flattens
  the distributions while it keeps the top class. EfficientNet-Lite0 at a 30% target: blocks had
  a held-out KL of 0.38 against resolution's 0.58, both kept the top class on 31 of 40 images,
  and on 800 other photos blocks kept 76.50 top-1 (80.25% agreement) against resolution's 80.00
  to 80.50 (191 or 190 px); at 22%, 34 against 31 of 40, and blocks kept 81.25 against 80.00: the
  rule kept the better lever at both (benchmarks/results/real_models.md). Recovery behind a resize
  halved the held-out KL and moved top-1 on the 800 by under a point
  (benchmarks/studies/results/lite0_recovery.md);
* a detector: the higher mAP50 of the original's detections (the lower of both ways, as
  ``check_fidelity`` warns on it), since behind a resize its anchors are fewer and its output's
  relative error is not defined; ties to resolution;
* any other output: the lower relative error.

Why both are run rather than guessed: which lever wins depends on the model. CIFAR ResNet-56 at a
22% cut keeps 93.1 top-1 with blocks and recovery but 89.3 behind a resize (26 of 32 px);
EfficientNet-Lite0 keeps 84.0 at 20% behind a resize, in seconds, against 80.3 with blocks after
35 minutes (benchmarks/results/real_models.md). Resolution runs first, since it costs seconds and
says in one line where it cannot apply (outputs that follow the input's size, a network that
cannot run smaller, a target not reached at half the side); the blocks run then has the time left.

Where recovery trained on the held-out images (images of 64 px or less: no early stopping), the
blocks' distance is measured on images it fitted and flatters it; the record says so. Where int8
alone reaches the goal neither lever cuts anything and the blocks run is skipped. A lever that
fails in its run (unreachable, nothing to drop) leaves the other; where both fail, one line gives
both reasons. Errors in the settings are found before either runs (every step's ``check``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from .detections import lower_map50
from .errors import GraphpruneError
from .passes import FinalCut, HeldOutFidelity, PassState, Pipeline, QuantizationPlan, ResolutionChoice
from .passes.plan_quantization import PlanQuantization


# held-out images by which one lever's top-class agreement must beat the other's to decide: one
# image either way is what resampling 40 photos moves
DECISIVE_IMAGES = 2


@dataclass(frozen=True)
class LeverRun:
    """One lever's run: its state (as far as it got), the one-line reason it failed or None, and
    its held-out distance."""

    lever: str
    state: PassState | None
    error: str | None
    seconds: float

    @property
    def fidelity(self) -> HeldOutFidelity | None:
        return self.state.artifacts.get(HeldOutFidelity) if self.state is not None and self.error is None else None

    def signals(self) -> dict[str, float]:
        """The written model against the original on the held-out images: the first output's top-class
        agreement and class KL where it classifies, and its relative error."""
        fidelity = self.fidelity
        if fidelity is None or fidelity.result is None:
            return {}
        first = next(iter(fidelity.result.get("outputs", {}).values()), {})
        named = (("agreement", "agreement"), ("output KL", "kl"), ("relative error", "relative_error"))  # KL: reported
        signals = {name: float(first[key]) for name, key in named if first.get(key) is not None}
        ranked = lower_map50(first.get("detections") or {})
        if ranked is not None:
            signals["mAP50"] = ranked
        return signals

    def to_dict(self) -> dict:
        fidelity = self.fidelity
        final = self.state.artifacts.get(FinalCut) if self.state is not None and self.error is None else None
        return {"error": self.error, "seconds": round(self.seconds, 1),
                "distance": self.signals(),
                "cut": final.cut if final is not None else None,
                "trained_on_holdout": fidelity.trained_on if fidelity is not None else None}


def run_lever(lever: str, steps: list, model, ctx, state: PassState) -> LeverRun:
    """Run ``steps`` on ``state``; a GraphpruneError raised while they run (the lever cannot reach the
    target, or cannot apply to this model) is the run's ``error``, not the caller's."""
    start = time.perf_counter()
    try:
        Pipeline(steps).run(model, ctx, state)
    except GraphpruneError as exc:
        return LeverRun(lever, state, str(exc), time.perf_counter() - start)
    return LeverRun(lever, state, None, time.perf_counter() - start)


def choose(resolution: LeverRun, blocks: LeverRun | None) -> tuple[LeverRun, str]:
    """The run kept and why."""
    if blocks is None:
        if resolution.error is not None:
            raise GraphpruneError(resolution.error)
        return resolution, "int8 alone reaches the goal: no lever is needed"
    runs = [r for r in (resolution, blocks) if r.error is None]
    if not runs:
        raise GraphpruneError(f"neither lever reaches the target: blocks: {blocks.error}; "
                              f"resolution: {resolution.error}")
    if len(runs) == 1:
        other = blocks if runs[0] is resolution else resolution
        return runs[0], f"{runs[0].lever} alone: {other.lever} failed ({other.error})"
    first, second = resolution.signals(), blocks.signals()
    flattered = " (blocks' recovery trained on these images)" if blocks.fidelity.trained_on else ""
    if "agreement" in first and "agreement" in second:  # a classifier: the user's measure first
        images = blocks.fidelity.images
        ours, theirs = round(first["agreement"] * images), round(second["agreement"] * images)
        agreed = (f"the original's top class on {ours} of {images} held-out images with resolution, "
                  f"{theirs} with blocks{flattered}")
        if abs(ours - theirs) >= DECISIVE_IMAGES:
            kept = resolution if ours > theirs else blocks
            return kept, f"{kept.lever}: {agreed}"
        # within one image: resolution, whose held-out figures nothing was fitted to (see the docstring)
        return resolution, f"resolution: {agreed} (within {DECISIVE_IMAGES - 1}: the untrained lever is kept)"
    if "mAP50" in first and "mAP50" in second:  # a detector: its detections, whatever its anchor count
        kept = resolution if first["mAP50"] >= second["mAP50"] else blocks
        return kept, (f"{kept.lever}: the original's held-out detections at mAP50 {first['mAP50']:.3f} (the lower "
                      f"of both ways) with resolution, {second['mAP50']:.3f} with blocks{flattered}")
    if "relative error" not in first or "relative error" not in second:  # check_fidelity could not compare
        return blocks, "blocks: the held-out outputs could not be compared"
    kept = resolution if first["relative error"] <= second["relative error"] else blocks
    return kept, (f"{kept.lever}: held-out relative error {first['relative error']:.4g} with resolution, "
                  f"{second['relative error']:.4g} with blocks{flattered}")


def optimize_auto(model, ctx, config, default_pipeline) -> tuple[PassState, dict]:
    """Both levers' default pipelines on one context; the state kept and the report's ``lever``."""
    resolution_steps = default_pipeline(replace(config, lever="resolution"))
    blocks_steps = [s for s in default_pipeline(replace(config, lever="blocks")) if not isinstance(s, PlanQuantization)]
    for step in resolution_steps + blocks_steps:  # the settings' errors before anything runs
        step.check(model, ctx)
    resolution = run_lever("resolution", resolution_steps, model, ctx, PassState(model))
    choice = resolution.state.artifacts.get(ResolutionChoice)
    blocks = None
    if choice is None or choice.scale is not None:  # a None scale: int8 alone reached the goal, no lever needed
        given = PassState(model)
        plan = resolution.state.artifacts.get(QuantizationPlan)  # made before resolution's own steps ran
        if plan is not None:
            given.artifacts.put(plan)
        elif any(isinstance(s, PlanQuantization) for s in resolution_steps):
            blocks_steps = default_pipeline(replace(config, lever="blocks"))  # planning itself failed: plan again
        blocks = run_lever("blocks", blocks_steps, model, ctx, given)
    kept, reason = choose(resolution, blocks)
    record = {"chosen": kept.lever, "reason": reason,
              "candidates": {r.lever: r.to_dict() for r in (resolution, blocks) if r is not None}}
    return kept.state, record
