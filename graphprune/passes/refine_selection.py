"""Analysis: improve the greedy block set by its *joint* recoverability, then re-meet the target.

The greedy selection (:mod:`.select_blocks`) adds blocks by single-block score, which assumes that
the error of dropping a set is the sum of its blocks' errors. At deep cuts it is not. On ResNet-56
at 40% (`benchmarks/studies/results/refine_study.md`), over 23 eleven-block sets recovered with the same
budget (two seeds), the sum of single-block recoverabilities ranks the sets' recovered top-1 at
Spearman 0.19 and 0.55, while the joint recoverability

    J(S) = held-out feature MSE after fitting adaptors around every gap of S at once

(the PRACTISE estimator applied to the whole set: :func:`.recoverability.set_scorer`, with 50
steps like the single-block scores) ranks them at 0.86 and 0.93 (0.78 and 0.86 without the two
deliberately lopsided sets; the sum: 0.05 and 0.32). Sets that empty one stage fit badly together
although each block alone recovers well. A joint fit has adaptors at every gap, which 50 steps
leave short of converged, so J is fitted with ``RefineSettings.joint_iterations`` (200) steps.

So the greedy set S is refined by local search on J, first improvement:

* a move swaps one chosen block ``b`` for one unchosen ``c`` from another group of identical blocks
  (:mod:`.pool_latency`; a block without a twin is a group of its own): ``b`` is the chosen block
  of its group with the worst single score, ``c`` the unchosen one of its group with the best;
* the new set's predicted cut (the sum of its pooled single-block savings, corrected by how far
  that sum missed the greedy set's measured cut) must fall short of the goal by at most
  ``tolerance``; where ``c`` saves less than ``b`` and the set falls below that, the best-scored
  other unchosen blocks are added until it does not (blocks differ in cost: on an Intel Xeon one
  stage-1 block of ResNet-56 saves 5.1%, a stage-2 block 3.7%), so the target stays in reach;
* moves are tried in order of how little they raise the summed single-block recoverabilities (the
  additive guess); the first that
  lowers J by more than ``min_gain`` (relative; less is fitting noise) is taken and the round
  restarts; the search stops when no move helps or after ``max_evaluations`` joint fits.

The refined set is then measured as a whole, like the greedy one: its blocks in score order, then
the other candidates, added until the measured cut reaches the goal.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from ..interrupts import raise_if_interrupted
from ..model import Model
from .base import Analysis, PassResult
from .find_blocks import Blocks
from .measure_latency import BlockLatencyTable
from .plan_quantization import SELECTION_CACHE, QuantizationPlan, measuring_backend, no_block_needed
from .pool_latency import PooledLatency
from .recoverability import BlockRecoverabilities, RecoverabilitySettings, data_key, set_scorer
from .select_blocks import block_scores, goal_cut, scoring_latency, select_blocks
from .selection import BlockScore, Selection


@dataclass(frozen=True)
class RefineSettings:
    # Defaults: 20 joint fits of 200 steps take 6-10 minutes for ResNet-56 on a 2-core CPU.
    max_evaluations: int = 20  # 0: keep the greedy set
    tolerance: float = 0.005  # how far the corrected predicted cut may fall short of the goal
    min_gain: float = 0.01  # a move must lower J by more than this fraction
    # Adaptor steps of each joint fit (None: the single-block scores' count). A set has adaptors
    # at every gap, and 50 steps leave them short of converged, stage-1 ones most: over 40
    # recovered 40% sets of ResNet-56 (benchmarks/studies/results/proxy_study.md), J after 200 steps ranks
    # the sets' jpeg10k top-1 at Spearman 0.76 against 0.62 after 50, and their lossless1000 top-1
    # (1000 images: noisier) at 0.88 either way.
    joint_iterations: int | None = 200
    # Stop searching once the next joint fit would end past this many seconds (timed on the fits
    # so far; None: no limit). With optimize's time budget, at most REFINE_SHARE of the time left.
    max_seconds: float | None = None


# Of the time left when refinement starts under a time budget, the share it may spend: recovery,
# which needs most of it, follows (on EfficientNet-Lite0 a joint fit costs minutes on 2 cores).
REFINE_SHARE = 0.25


def joint_scoring(scoring: RecoverabilitySettings, settings: RefineSettings) -> RecoverabilitySettings:
    """The estimator settings of a joint fit: the single-block ones with ``joint_iterations`` steps."""
    return replace(scoring, iterations=settings.joint_iterations or scoring.iterations)


def candidate_moves(chosen: list[str], scores: list[BlockScore], groups: list[list[str]],
                    min_predicted: float) -> list[tuple[str, list[str]]]:
    """(out, ins) moves from ``chosen``, in order of the rise in summed single-block
    recoverability: ``out`` leaves, ``ins[0]`` (from another group) comes in, and while the set's
    summed saving is below ``min_predicted`` the best-scored other unchosen blocks follow."""
    by_name = {s.name: s for s in scores if s.saved_fraction > 0}
    ranked = [s.name for s in scores if s.name in by_name]
    grouped = {n for g in groups for n in g}
    all_groups = [[n for n in g if n in by_name] for g in groups] + [[n] for n in ranked if n not in grouped]
    chosen_set = set(chosen)
    predicted = sum(by_name[n].saved_fraction for n in chosen if n in by_name)
    moves = []
    for out_group in all_groups:
        inside = [n for n in out_group if n in chosen_set]
        if not inside:
            continue
        out = max(inside, key=lambda n: (by_name[n].score, n))
        for in_group in all_groups:
            outside = [n for n in in_group if n not in chosen_set]
            if in_group is out_group or not outside:
                continue
            ins = [min(outside, key=lambda n: (by_name[n].score, n))]
            total = predicted - by_name[out].saved_fraction + by_name[ins[0]].saved_fraction
            for extra in (n for n in ranked if n not in chosen_set and n not in ins):
                if total >= min_predicted:
                    break
                ins.append(extra)
                total += by_name[extra].saved_fraction
            if total < min_predicted:
                continue
            rise = sum(by_name[n].recoverability for n in ins) - by_name[out].recoverability
            moves.append((rise, out, ins))
    return [(out, ins) for _, out, ins in sorted(moves)]


def refine_set(chosen: list[str], scores: list[BlockScore], groups: list[list[str]], joint, min_predicted: float,
               settings: RefineSettings = RefineSettings(), cache=None) -> tuple[list[str], list[dict]]:
    """Local search from ``chosen`` (see the module docstring). ``joint(names) -> float``; every
    set visited keeps a summed single-block saving of at least ``min_predicted``. ``cache``
    (dict-like) remembers J per set, so a rerun repeats no fit. Returns the refined set (in score
    order) and one record per evaluated set."""
    order = {s.name: i for i, s in enumerate(scores)}
    evaluations: list[dict] = []

    def evaluate(names: list[str]) -> float:
        key = "|".join(sorted(names))
        if cache is not None and key in cache:
            value = float(cache.get(key))
        else:
            value = float(joint(names))
            if cache is not None:
                cache[key] = value
        evaluations.append({"blocks": sorted(names, key=order.get), "joint_recoverability": value})
        return value

    current = sorted(chosen, key=order.get)
    start = time.perf_counter()

    def out_of_time() -> bool:  # the next fit, at the mean time of those so far, would end past the limit
        if settings.max_seconds is None:
            return False
        spent = time.perf_counter() - start
        if spent + spent / len(evaluations) > settings.max_seconds:
            evaluations[-1]["then_stopped"] = f"time limit {settings.max_seconds:.0f} s"
            return True
        return False

    if settings.max_evaluations <= 0 or (settings.max_seconds is not None and settings.max_seconds <= 0):
        return current, evaluations
    best = evaluate(current)
    improved = True
    while improved and len(evaluations) < settings.max_evaluations:
        improved = False
        for out, ins in candidate_moves(current, scores, groups, min_predicted):
            raise_if_interrupted()
            if len(evaluations) >= settings.max_evaluations or out_of_time():
                improved = False
                break
            trial = sorted([n for n in current if n != out] + ins, key=order.get)
            value = evaluate(trial)
            if value < best * (1 - settings.min_gain):
                current, best, improved = trial, value, True
                evaluations[-1]["accepted"] = True
                break
    return current, evaluations


def first_fit_too_long(scored: BlockRecoverabilities, joint: RecoverabilitySettings,
                       max_seconds: float | None) -> str | None:
    """Why refinement should not start, or None: its first joint fit, estimated from scoring's
    seconds a block scaled by the steps (``joint.iterations`` against scoring's), would end past
    ``max_seconds``. A fit cannot be stopped halfway, and later fits are timed on the ones before,
    so without this the first always ran: nudenet's YOLOv8n (320 px, 6 blocks) under a 900 s budget,
    scoring having taken 82 s a block (about 390 s left, a quarter of it refinement's), spent 291 s
    on refinement's one fit and left its recovery 42 s (22 steps)."""
    per_block = scored.seconds_per_block()
    if max_seconds is None or per_block is None:
        return None
    estimate = per_block * joint.iterations / max(scored.settings.iterations, 1)
    if estimate <= max_seconds:
        return None
    return (f"a joint fit would take about {estimate:.0f} s (scoring took {per_block:.0f} s a block, "
            f"{joint.iterations} steps against {scored.settings.iterations}), more than the {max_seconds:.0f} s "
            "refinement may spend")


@dataclass
class Refinement:
    """Artefact: what the refinement did (the greedy set and its cut, each joint fit, the outcome)."""

    record: dict


class RefineSelection(Analysis):
    """Refine the ``Selection`` by joint recoverability and re-measure it (see the module
    docstring): it updates ``Selection`` (the greedy one stays in ``Refinement``). Groups of
    identical blocks come from ``PooledLatency`` where a step pooled them, else every block is a
    group of its own. Joint fits use the ``BlockRecoverabilities``' estimator and resume from
    ``ctx.cache``; measured sets are shared with :class:`~.select_blocks.SelectBlocks` (quantised
    like its candidates where a usable ``QuantizationPlan`` is present). An empty selection
    (quantisation alone reaches the target: :func:`~.plan_quantization.no_block_needed`) is kept as it is."""

    name = "refine_selection"
    config_field = "refine"
    requires = (Blocks, BlockRecoverabilities, BlockLatencyTable, Selection)
    optional = (PooledLatency, QuantizationPlan)
    provides = (Selection, Refinement)

    def __init__(self, settings: RefineSettings = RefineSettings()):
        self.settings = settings

    def run(self, model: Model, ctx, inputs) -> PassResult:
        greedy: Selection = inputs[Selection]
        recoverabilities = inputs[BlockRecoverabilities]
        scoring = recoverabilities.settings
        record = {"settings": asdict(self.settings), "greedy": greedy.blocks, "greedy_cut": greedy.cut.cut}
        if not greedy.blocks or scoring.estimator != "practise":
            record["skipped"] = ((no_block_needed(ctx, inputs) or "no block selected") if not greedy.blocks
                                 else f"estimator {scoring.estimator}")
            return PassResult(model, record=record, artifacts=[greedy, Refinement(record)])
        latency = scoring_latency(inputs)
        scores = block_scores({r.name: r.recoverability for r in recoverabilities}, latency)
        joint_settings = joint_scoring(scoring, self.settings)
        train, holdout = ctx.need("train", self.name), ctx.need("holdout", self.name)
        joint = set_scorer(model, inputs[Blocks], train, holdout, joint_settings, ctx.feature_node)
        saved = {s.name: s.saved_fraction for s in scores}
        error = sum(saved.get(n, 0.0) for n in greedy.blocks) - greedy.cut.cut  # prediction - measurement
        target = ctx.need("latency_cut", self.name)
        min_predicted = goal_cut(target, ctx.margin) - self.settings.tolerance + error
        cache = ctx.cache("joint", data_key(ctx), asdict(joint_settings), ctx.feature_node)
        settings = replace(self.settings, max_seconds=ctx.stage_budget(self.settings.max_seconds, REFINE_SHARE))
        record["max_seconds"] = settings.max_seconds
        too_long = first_fit_too_long(recoverabilities, joint_settings, settings.max_seconds)
        if too_long:
            record["skipped"] = too_long
            return PassResult(model, record=record, artifacts=[greedy, Refinement(record)])
        refined, evaluations = refine_set(greedy.blocks, scores, latency.pooled_groups, joint, min_predicted,
                                          settings, cache)
        record.update(evaluations=evaluations, refined=refined)
        if set(refined) == set(greedy.blocks):
            return PassResult(model, record=record, artifacts=[greedy, Refinement(record)])
        rest = [s.name for s in scores if s.saved_fraction > 0 and s.name not in set(refined)]
        measuring = measuring_backend(ctx, inputs, self.name)
        selection = select_blocks(model, inputs[Blocks], scores, target, measuring.backend, ctx.latency, ctx.margin,
                                  order=refined + rest, cache=measuring.cache(ctx, SELECTION_CACHE),
                                  reference=measuring.reference, alone=measuring.plan and measuring.plan.alone)
        record.update(dropped=selection.blocks, measured_cut=selection.cut.cut, measurements=selection.measurements)
        return PassResult(model, record=record, artifacts=[selection, Refinement(record)])
