"""``lever="auto"``: blocks or resolution, whichever keeps the original's outputs closer on held-out images.

    resolution = default_pipeline(lever="resolution")   # seconds: sides timed, nothing trained
    blocks     = default_pipeline(lever="blocks")       # scoring, selection, recovery
    keep argmin over the two of  distance(written model, original) on ctx.holdout

Both runs share one :class:`~graphprune.passes.PassContext`: the same held-out images, the same
deadline, the same caches; the int8 plan, which depends on the original alone, is made once and
given to the blocks run. ``distance`` is :mod:`~graphprune.passes.check_fidelity`'s evaluation of
the written file (the int8 one where a step made it) against the original, labels dropped: for a
classifier the class distributions' KL(original || optimised) of its first output, the signal
recovery's guard keeps checkpoints by (on EfficientNet-Lite0's 200 tiny photos it marked the
192 -> 191 px cliff, 0.22 -> 0.63, where top-1 on 800 other photos fell 84.38 -> 80.00:
benchmarks/studies/results/lite0_resolution.md); for any other output, or where both KLs are
negligible (a softmax saturated on one class for every image), its relative error.

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

from .errors import GraphpruneError
from .passes import FinalCut, HeldOutFidelity, PassState, Pipeline, QuantizationPlan, ResolutionChoice
from .passes.plan_quantization import PlanQuantization


NEGLIGIBLE_KL = 1e-6


@dataclass(frozen=True)
class LeverRun:
    """One lever's run: its state, or the one-line reason it failed; its held-out distance."""

    lever: str
    state: PassState | None
    error: str | None
    seconds: float

    @property
    def fidelity(self) -> HeldOutFidelity | None:
        return self.state.artifacts.get(HeldOutFidelity) if self.state is not None else None

    def signals(self) -> dict[str, float]:
        """The written model's distance to the original on the held-out images: the first output's
        class KL where it classifies, and its relative error."""
        fidelity = self.fidelity
        if fidelity is None or fidelity.result is None:
            return {}
        first = next(iter(fidelity.result.get("outputs", {}).values()), {})
        return {name: float(first[key]) for name, key in (("output KL", "kl"), ("relative error", "relative_error"))
                if first.get(key) is not None}

    def to_dict(self) -> dict:
        fidelity = self.fidelity
        final = self.state.artifacts.get(FinalCut) if self.state is not None else None
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
        return LeverRun(lever, None, str(exc), time.perf_counter() - start)
    return LeverRun(lever, state, None, time.perf_counter() - start)


def choose(resolution: LeverRun, blocks: LeverRun | None) -> tuple[LeverRun, str]:
    """The run kept and why."""
    if blocks is None:
        return resolution, "int8 alone reaches the goal: no lever is needed"
    runs = [r for r in (resolution, blocks) if r.error is None]
    if not runs:
        raise GraphpruneError(f"neither lever reaches the target: blocks: {blocks.error}; "
                              f"resolution: {resolution.error}")
    if len(runs) == 1:
        other = blocks if runs[0] is resolution else resolution
        return runs[0], f"{runs[0].lever} alone: {other.lever} failed ({other.error})"
    signal = comparable_signal(resolution.signals(), blocks.signals())
    if signal is None:  # no held-out comparison (check_fidelity could not run)
        return blocks, "blocks: the held-out outputs could not be compared"
    kept = min(runs, key=lambda r: r.signals()[signal])
    flattered = " (blocks' recovery trained on these images)" if blocks.fidelity.trained_on else ""
    return kept, (f"{kept.lever}: held-out {signal} {resolution.signals()[signal]:.4g} with resolution, "
                  f"{blocks.signals()[signal]:.4g} with blocks{flattered}")


def comparable_signal(first: dict[str, float], second: dict[str, float]) -> str | None:
    """The class KL where both runs have it and it separates them, else the relative error (None
    where either lacks it). A saturated softmax (one class near 1 for every image: a CIFAR
    ResNet-20 on noise images) gives both a KL below NEGLIGIBLE_KL whatever the logits do."""
    if "output KL" in first and "output KL" in second and max(first["output KL"], second["output KL"]) > NEGLIGIBLE_KL:
        return "output KL"
    return "relative error" if "relative error" in first and "relative error" in second else None


def optimize_auto(model, ctx, config, default_pipeline) -> tuple[PassState, dict]:
    """Both levers' default pipelines on one context; the state kept and the report's ``lever``."""
    resolution_steps = default_pipeline(replace(config, lever="resolution"))
    blocks_steps = [s for s in default_pipeline(replace(config, lever="blocks")) if not isinstance(s, PlanQuantization)]
    for step in resolution_steps + blocks_steps:  # the settings' errors before anything runs
        step.check(model, ctx)
    resolution = run_lever("resolution", resolution_steps, model, ctx, PassState(model))
    choice = resolution.state.artifacts.get(ResolutionChoice) if resolution.state is not None else None
    blocks = None
    if choice is None or choice.scale is not None:  # None scale: int8 alone reached the goal
        given = PassState(model)
        plan = resolution.state.artifacts.get(QuantizationPlan) if resolution.state is not None else None
        if plan is None and any(isinstance(s, PlanQuantization) for s in resolution_steps):
            blocks_steps = default_pipeline(replace(config, lever="blocks"))  # the plan failed with resolution
        elif plan is not None:
            given.artifacts.put(plan)
        blocks = run_lever("blocks", blocks_steps, model, ctx, given)
    kept, reason = choose(resolution, blocks)
    record = {"chosen": kept.lever, "reason": reason,
              "candidates": {r.lever: r.to_dict() for r in (resolution, blocks) if r is not None}}
    return kept.state, record
