"""Analysis: choose the blocks to drop so that the *measured* latency cut reaches the target.

    score(b) = recoverability(b) / saved_fraction(b)

(lower is better: little feature error per unit of latency saved; a block whose removal saves
nothing measurable is never chosen; in the pipeline ``saved_fraction`` is pooled over identical
blocks, :mod:`.pool_latency`). Blocks are added in score order; savings of single blocks do
not add up exactly (``benchmarks/results/latency.md``: within about 2 points), so once the running
sum of single-block savings comes within ``ADDITIVITY_SLACK`` of the goal, every further set is
measured as a whole against the original (interleaved, on the same backend), and blocks are added
until the measured cut reaches ``target + margin``. Measuring early matters: a block is worth
3-4% of ResNet-56, and overshooting the target costs accuracy for nothing. If dropping every
candidate cannot reach the target, that is an error that names the largest cut measured.

Then the set is trimmed: a block added early may be unneeded once a later one is in (blocks
differ in cost; ResNet-20's blocks are 8-12% of its latency each, and on one tiny set the order
layer2.2, layer2.1, layer1.0 reached a 22% goal only at the third block, with a cut of 0.34,
although layer2.2 and layer1.0 alone cut 0.23). Chosen blocks are tried in reverse order (the
least wanted first; the last one added too, unless the set before it was measured short); a block
stays in the network when the set without it still measures at the goal. Only blocks whose single
saving the measured surplus could plausibly cover (within ``ADDITIVITY_SLACK``) are tried, so a
set with no surplus costs no measurement. The result: every chosen block is needed, as measured.

With int8 planned (:func:`~.plan_quantization.measuring_backend`), candidates are timed quantised
against the *float* original (``reference``), so quantisation's own cut counts toward the target:
selection starts from the empty set as ``plan_quantization`` measured it (``QuantizationPlan.alone``,
:func:`~.plan_quantization.measure_quantization_alone`), and where that reaches the goal no block
is chosen (and no block was profiled or scored: :func:`~.plan_quantization.no_block_needed`).
A block's float saving s then counts as its share of what quantisation left, predicted cut =
1 - (1 - alone) * (1 - sum s): counted from 0, a 50% target with int8 alone at 48.6% added three
blocks before the first measurement (79.7%, trimmed to 67.8%) where one would do.
"""

from __future__ import annotations

import math

from ..backends.base import CutMeasurement, LatencyBackend, LatencySettings
from ..errors import GraphpruneError
from ..interrupts import raise_if_interrupted
from ..model import Model
from .base import Analysis, PassResult
from .drop_blocks import drop_blocks
from .find_blocks import Block, Blocks
from .measure_latency import BlockLatencyTable, measure_cut
from .plan_quantization import SELECTION_CACHE, QuantizationPlan, measuring_backend, no_block_needed
from .quantize_plan import closest_candidate
from .pool_latency import PooledLatency
from .recoverability import BlockRecoverabilities
from .selection import BlockScore, Selection, check_latency_cut, goal_cut

ADDITIVITY_SLACK = 0.02
SELECTION_RULE = "add in order until the measured goal, then trim unneeded blocks"  # recorded by benchmarks


def block_scores(recoverability: dict[str, float], latency: BlockLatencyTable) -> list[BlockScore]:
    """Scores in ascending order (best candidates first)."""
    scores = []
    for row in latency.rows:
        if row.name not in recoverability:
            continue
        saved = row.saved_fraction
        score = recoverability[row.name] / saved if saved > 0 else math.inf
        scores.append(BlockScore(row.name, recoverability[row.name], saved, row.saved_ms, score))
    return sorted(scores, key=lambda s: (s.score, s.name))


def select_blocks(model: Model, blocks: list[Block], scores: list[BlockScore], target: float,
                  backend: LatencyBackend, settings: LatencySettings, margin: float = 0.0,
                  order: list[str] | None = None, cache=None, reference: LatencyBackend | None = None,
                  alone: CutMeasurement | None = None, int8_off: str | None = None) -> Selection:
    """Greedy selection in score order (or in ``order``, for baselines) until the measured cut
    reaches ``target + margin``. ``cache`` (dict-like) remembers each measured combination, so a
    rerun of the same command makes the same choice instead of re-rolling timing noise.
    ``reference``: the backend the original is timed on where it is not ``backend`` (candidates
    quantised, the original float); ``alone``: then the empty set's cut, quantisation alone, as
    ``plan_quantization`` measured it: the selection starts from it (none chosen where it reaches
    the goal). ``int8_off``: why a quantisation plan left int8 off, for the line an unreachable
    target raises."""
    check_latency_cut(target)
    goal = goal_cut(target, margin)
    ranked = order if order is not None else [s.name for s in scores if s.saved_fraction > 0]
    saved = {s.name: s.saved_fraction for s in scores}
    measure = set_measurer(model, blocks, backend, settings, cache, reference)

    chosen: list[str] = []
    measurements: list[dict] = []
    last: CutMeasurement | None = None
    # a block saves its share of what is left after quantisation: int8 times it as it times the rest
    left = 1.0 - (alone.cut if alone is not None else 0.0)
    predicted = 1.0 - left
    if alone is not None:
        last = alone
        measurements.append({"blocks": 0, "predicted_cut": 0.0, "measured_cut": alone.cut})
        if alone.cut >= goal:
            return Selection([], alone, scores, measurements)
    for name in ranked:
        raise_if_interrupted()
        chosen.append(name)
        predicted += left * max(saved.get(name, 0.0), 0.0)
        if predicted < goal - ADDITIVITY_SLACK and name != ranked[-1]:
            continue
        last = measure(chosen)
        measurements.append({"blocks": len(chosen), "predicted_cut": predicted, "measured_cut": last.cut})
        if last.cut >= goal:
            chosen, last = _trim(chosen, last, goal, {n: left * v for n, v in saved.items()}, measure, measurements)
            return Selection(chosen, last, scores, measurements)
    raise unreachable(target, goal, len(ranked), last.cut if last is not None else 0.0, alone, int8_off)


def set_measurer(model: Model, blocks: list[Block], backend: LatencyBackend, settings: LatencySettings, cache=None,
                 reference: LatencyBackend | None = None):
    """``measure(names) -> CutMeasurement``: ``model`` with the named blocks dropped against ``model``
    (timed on ``reference`` where given), interleaved, read from and written to ``cache`` (keyed by
    ``"|".join(names)``); the original's run is prepared once, on first use."""
    prepared = []

    def measure(names: list[str]) -> CutMeasurement:
        key = "|".join(names)
        if cache is not None and key in cache:
            return CutMeasurement.from_dict(cache.get(key))
        if not prepared:
            prepared.append((reference or backend).prepare(model, settings))
        cut = measure_cut(backend, model, drop_blocks(model, names, blocks), settings, prepared[0])
        if cache is not None:
            cache[key] = cut.to_dict()
        return cut

    return measure


def run_set_measurer(measuring, model: Model, blocks: list[Block], ctx):
    """:func:`set_measurer` on a pass's ``measuring`` backend (:func:`~.plan_quantization.measuring_backend`:
    quantised where int8 is planned) and the run's resume cache of measured sets, which every pass
    measuring sets shares."""
    return set_measurer(model, blocks, measuring.backend, ctx.latency, measuring.cache(ctx, SELECTION_CACHE),
                        measuring.reference)


def unreachable(target: float, goal: float, candidates: int, best: float, alone: CutMeasurement | None,
                int8_off: str | None, blocks_found: int | None = None) -> GraphpruneError:
    """The one line a target out of reach gets: the largest cut measured with every candidate dropped
    (``blocks_found``: how many residual blocks the model has, where known)."""
    quantised = "" if alone is None else f" with int8 quantisation (quantisation alone: {alone.cut:.1%})"
    short = f", short of {goal:.1%} (the target plus the margin)" if best >= target else ""
    hint = "" if alone is not None else (f"; int8 was left off ({int8_off})" if int8_off
                                         else "; int8 may reach it (quantize 'auto')")
    if candidates == 0:  # no residual block, or none whose own measured saving is positive
        reach = hint if alone is None else f"; int8 quantisation alone cuts {alone.cut:.1%}{short}"
        nothing = ("no residual blocks found in this model (nothing to drop)" if blocks_found == 0 else
                   "no block of this model can be dropped for a saving on this target")
        return GraphpruneError(f"a {target:.0%} latency cut is not reachable: {nothing}{reach}")
    return GraphpruneError(f"a {target:.0%} latency cut is not reachable: dropping all {candidates} candidate blocks "
                           f"cuts {best:.1%} on this target{quantised}{short}{hint}")


def _trim(chosen: list[str], cut: CutMeasurement, goal: float, saved: dict[str, float], measure,
          measurements: list[dict]) -> tuple[list[str], CutMeasurement]:
    """``chosen`` without the blocks it does not need to measure at ``goal`` (module docstring);
    ``saved``: each block's expected saving in this set."""
    chosen = list(chosen)
    short = {frozenset(chosen[:m["blocks"]]) for m in measurements if "without" not in m and m["measured_cut"] < goal}
    for name in reversed(chosen):
        raise_if_interrupted()
        if cut.cut - max(saved.get(name, 0.0), 0.0) < goal - ADDITIVITY_SLACK:
            continue  # the surplus cannot plausibly cover this block's saving
        trial = [n for n in chosen if n != name]
        if not trial or frozenset(trial) in short:
            continue  # measured short of the goal already (the set before the last block added)
        trimmed = measure(trial)
        measurements.append({"blocks": len(trial), "without": name, "measured_cut": trimmed.cut})
        if trimmed.cut >= goal:
            chosen, cut = trial, trimmed
    return chosen, cut


def scoring_latency(inputs) -> BlockLatencyTable:
    """The savings blocks are scored by: pooled over identical blocks where a step pooled them."""
    return inputs.get(PooledLatency) or inputs[BlockLatencyTable]


class SelectBlocks(Analysis):
    """Pick blocks by recoverability per latency saved until the measured cut reaches the target
    (``ctx.latency_cut`` + ``ctx.margin``, measured on ``ctx.backend``; candidates quantised where
    a usable ``QuantizationPlan`` is present, starting from its quantisation alone)."""

    name = "select_blocks"
    requires = (Blocks, BlockRecoverabilities, BlockLatencyTable)
    optional = (PooledLatency, QuantizationPlan)
    provides = (Selection,)

    def check(self, model: Model, ctx) -> None:
        check_latency_cut(ctx.need("latency_cut", self.name))

    def run(self, model: Model, ctx, inputs) -> PassResult:
        recoverability = {r.name: r.recoverability for r in inputs[BlockRecoverabilities]}
        scores = block_scores(recoverability, scoring_latency(inputs))
        measuring = measuring_backend(ctx, inputs, self.name)
        selection = select_blocks(model, inputs[Blocks], scores, ctx.need("latency_cut", self.name),
                                  measuring.backend, ctx.latency, ctx.margin, cache=measuring.cache(ctx, SELECTION_CACHE),
                                  reference=measuring.reference, alone=measuring.plan and measuring.plan.alone,
                                  int8_off=int8_off_reason(inputs.get(QuantizationPlan)))
        record = selection.to_dict()
        if not selection.blocks:
            record["note"] = no_block_needed(ctx, inputs)
        return PassResult(model, record=record, artifacts=[selection])


def int8_off_reason(plan: QuantizationPlan | None) -> str | None:
    """Why a quantisation plan that was made chose float (None where there is no plan or it chose int8)."""
    if plan is None or plan.config is not None:
        return None
    faster = closest_candidate(plan.candidates, 0.0) is not None
    return plan.reason.split("; auto leaves")[0] + ("; quantize 'int8' takes it anyway" if faster else "")
