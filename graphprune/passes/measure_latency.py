"""Analysis: what dropping each residual block saves on the target, measured, not estimated.

For a model M with blocks b_1..b_n and a backend (runtime + device + settings), block b's row is

    saved_ms(b)       = median(M) - median(M without b)
    saved_fraction(b) = 1 - median(M without b) / median(M)       (:func:`latency_cut`)

where both medians come from **one interleaved measurement** of the pair (M, M without b):
rounds of M, candidate, M, candidate, ... (:func:`~graphprune.backends.base.compare_interleaved`),
so drift of the machine (clock, heat, other load) during the pair hits both alike. The original is
prepared once and its run callable reused for every pair; only the candidate is built per block.

The original's reported statistics come from a dedicated measurement of the original alone
(:func:`~graphprune.backends.base.time_runs`, before the pairs), not from the pairs: alternating two
models run by run makes each evict the other's weights from the caches, which was measured to slow
*both* by 5-10% on ResNet-56 (2.31 ms alone, 2.48-2.52 ms interleaved, on a 2-core EPYC), while the
cut stayed within 0.2 percentage points of the cut from alternating in chunks of 20 runs. So the
fractions are the figures to use; each pair's absolute medians (``original_ms``, ``candidate_ms``)
and their difference ``saved_ms`` are a few per cent higher than either model would show alone.

Savings do not add up exactly: dropping two blocks changes what the runtime fuses and how caches
behave. :func:`measure_cut` therefore measures any candidate (a set of blocks dropped together)
against the original, interleaved in the same way; the block selection uses it to check
combinations.

Time: a pair costs the candidate's preparation plus both models' runs, about 9 s a block on
MaxViT-T at 224 px (55 blocks: 8 minutes). With a ``--time-budget``, ``profile_blocks`` takes at most
``PROFILE_SHARE`` of the time left when it starts, spent where it tells most: every block that has
no identical twin (:mod:`.pool_latency`) and one of each group of twins first, always (a block never
measured could not be ranked); the other twins then while the share lasts. A twin left unmeasured
stands in with its group's median (``BlockLatencyTable.unmeasured`` names it; it is not cached, so a
resumed run measures it), which is the figure pooling gives every twin anyway. MaxViT-T's 55 blocks
hold 16 distinct ones.

With int8 planned (:mod:`.plan_quantization`), ``profile_blocks`` times the blocks as the model will
run, quantised (:func:`~.plan_quantization.measuring_backend`), or times none where quantisation
alone already reaches the goal (:func:`~.plan_quantization.no_block_needed`); ``measure_result`` times
the written file's form: the quantised proto against the float original, interleaved with the
recovered float model, so the report splits the final cut into block dropping's share and quantisation's.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from ..backends.base import (CutMeasurement, LatencyBackend, LatencySettings, LatencyStats, RunOnce,
                             compare_interleaved, latency_cut, time_runs)
from ..errors import GraphpruneError
from ..interrupts import raise_if_interrupted
from ..model import Model
from .base import Analysis, PassResult
from .drop_blocks import drop_blocks
from .find_blocks import Block, Blocks, blocks_of, find_blocks
from .identical_blocks import identical_groups
from .plan_quantization import QuantizationPlan, measuring_backend, no_block_needed
from .quantize_result import QuantizedOnnx

log = logging.getLogger("graphprune")


@dataclass(frozen=True)
class BlockLatency:
    """One block's row: medians of the original and of the model without this block alone."""

    name: str
    saved_ms: float
    saved_fraction: float
    original_ms: float
    candidate_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockLatencyTable:
    """Per-block savings plus the original's latency and where it was measured."""

    original: LatencyStats
    rows: list[BlockLatency]
    settings: LatencySettings
    backend_info: dict
    pooled_groups: list[list[str]] = field(default_factory=list)  # set by pool_latency.pool_savings
    from_cache: int = 0  # rows read from a resume cache rather than measured in this run
    unmeasured: list[str] = field(default_factory=list)  # twins whose row is their group's median (no time left)

    def saved_fractions(self) -> dict[str, float]:
        return {row.name: row.saved_fraction for row in self.rows}

    def to_dict(self) -> dict:
        return {"latency_ms": self.original.to_dict(), "blocks": [row.to_dict() for row in self.rows],
                "settings": {**self.settings.to_dict(), **self.backend_info},
                **({"unmeasured": list(self.unmeasured)} if self.unmeasured else {})}


def measure_cut(backend: LatencyBackend, original: Model, candidate: Model, settings: LatencySettings,
                original_run: RunOnce | None = None,
                on_round: Callable[[int], None] | None = None) -> CutMeasurement:
    """Time ``candidate`` against ``original`` interleaved; pass ``original_run`` (from
    ``backend.prepare(original, settings)``) to reuse an already prepared original."""
    if original_run is None:
        original_run = backend.prepare(original, settings)
    candidate_run = backend.prepare(candidate, settings)
    original_stats, candidate_stats = compare_interleaved([original_run, candidate_run], settings, on_round=on_round)
    return CutMeasurement(original_stats, candidate_stats, latency_cut(original_stats, candidate_stats))


ORIGINAL_KEY = "__original__"
# with a --time-budget, profiling may take this share of the time left when it starts (every distinct
# block is measured even past it). A guard, not a knee: scoring takes half of what is left after it,
# then selection, refinement and recovery size themselves to the rest
PROFILE_SHARE = 0.25


def measure_block_latency(backend: LatencyBackend, model: Model, settings: LatencySettings,
                          blocks: list[Block] | None = None, progress: bool | None = None,
                          on_block: Callable[[BlockLatency], None] | None = None, cache=None,
                          twins: list[list[str]] | None = None, deadline: float | None = None) -> BlockLatencyTable:
    """The per-block table (see the module docstring), its rows in the order of ``blocks``.

    ``progress``: a tqdm bar on stderr; ``None`` shows it only when stderr is a terminal.
    ``on_block`` is called with each row as soon as it is measured. ``cache`` (a dict-like of JSON
    records, e.g. :class:`graphprune.cache.JsonCache`) keeps the original's statistics and every
    row as soon as it is measured, so an interrupted profile resumes where it stopped.
    ``twins``: groups of identical blocks (:func:`~.identical_blocks.identical_groups`); each group's
    first is measured with the blocks that have none, its others after them and, with a
    ``deadline`` (``time.monotonic()``), only while the mean pair so far still fits before it.
    """
    from tqdm import tqdm

    cache = {} if cache is None else cache
    blocks = find_blocks(model) if blocks is None else blocks
    later = {name for names in twins or () for name in names[1:]}
    original_run = None
    if ORIGINAL_KEY not in cache:
        original_run = backend.prepare(model, settings)
        cache[ORIGINAL_KEY] = time_runs(original_run, settings).to_dict()
    original = LatencyStats.from_dict(cache.get(ORIGINAL_KEY))
    rows: dict[str, BlockLatency] = {}
    pair_seconds: list[float] = []
    with tqdm(total=len(blocks), desc="measuring blocks", unit="block", file=sys.stderr, leave=False,
              disable=None if progress is None else not progress) as bar:
        for block in [b for b in blocks if b.name not in later] + [b for b in blocks if b.name in later]:
            raise_if_interrupted()
            bar.set_postfix_str(block.name)
            if block.name in cache:
                rows[block.name] = BlockLatency(**cache.get(block.name))
            elif block.name in later and deadline is not None and pair_seconds and \
                    time.monotonic() + statistics.fmean(pair_seconds) > deadline:
                pass  # its group's median stands in, below
            else:
                started = time.monotonic()
                original_run = original_run or backend.prepare(model, settings)
                candidate = drop_blocks(model, [block.name], blocks)
                cut = measure_cut(backend, model, candidate, settings, original_run)
                row = BlockLatency(block.name, cut.saved_ms, cut.cut, cut.original.median_ms, cut.candidate.median_ms)
                rows[block.name] = row
                cache[block.name] = row.to_dict()
                pair_seconds.append(time.monotonic() - started)
                if on_block is not None:
                    on_block(row)
            bar.update()
    unmeasured = [b.name for b in blocks if b.name not in rows]
    for names in twins or ():
        measured = [rows[n] for n in names if n in rows]
        for name in (n for n in names if n not in rows):
            rows[name] = BlockLatency(name, statistics.median(r.saved_ms for r in measured),
                                      statistics.median(r.saved_fraction for r in measured),
                                      statistics.median(r.original_ms for r in measured),
                                      statistics.median(r.candidate_ms for r in measured))
    return BlockLatencyTable(original, [rows[b.name] for b in blocks], settings, backend.describe(settings),
                             unmeasured=unmeasured)


class MeasureBlockLatency(Analysis):
    """Per-block latency savings on ``ctx.backend`` (see the module docstring), for the blocks of
    the ``Blocks`` artefact where an earlier step found them; with a usable ``QuantizationPlan``,
    the quantised original against the quantised model without the block, and no block at all where
    quantisation alone reaches the goal. Rows resume from ``ctx.cache``."""

    name = "profile_blocks"
    optional = (Blocks, QuantizationPlan)
    provides = (BlockLatencyTable,)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        measuring = measuring_backend(ctx, inputs, self.name)
        skipped = no_block_needed(ctx, inputs)
        if skipped:  # no row; the original's figures: the quantised model as timed with no block dropped
            table = BlockLatencyTable(measuring.plan.alone.candidate, [], ctx.latency,
                                      measuring.backend.describe(ctx.latency))
            return PassResult(model, record={**table.to_dict(), "from_cache": 0, "skipped": skipped}, artifacts=[table])
        blocks = blocks_of(model, inputs)
        cache = measuring.cache(ctx, "latency")
        cached = sum(1 for b in blocks if b.name in cache)
        seconds = ctx.stage_budget(None, share=PROFILE_SHARE)
        twins = identical_groups(model, blocks) if seconds is not None else None
        table = measure_block_latency(measuring.backend, model, ctx.latency, blocks,
                                      None if ctx.show_progress else False, cache=cache, twins=twins,
                                      deadline=None if seconds is None else time.monotonic() + seconds)
        table.from_cache = cached
        if table.unmeasured:
            log.info("profiling: %d of %d blocks measured in %.0f s of the time budget; %d twins take their "
                     "group's median", len(blocks) - len(table.unmeasured), len(blocks), seconds, len(table.unmeasured))
        record = {**table.to_dict(), "from_cache": cached}
        if seconds is not None:
            record["time_limit"] = {"seconds": seconds, "unmeasured_twins": len(table.unmeasured)}
        return PassResult(model, record=record, artifacts=[table])


@dataclass(frozen=True)
class FinalCut(CutMeasurement):
    """Artefact: the pipeline's final model timed against the original, independently of selection.
    Quantised: ``candidate`` is the int8 file's form and ``float_candidate`` the recovered float
    model, timed in the same interleaved run."""

    float_candidate: LatencyStats | None = None
    given_file: dict | None = None  # :func:`time_given_file`, with "cut": the result against that file

    @property
    def float_cut(self) -> float:
        """The cut of block dropping alone (the float model against the original)."""
        return self.cut if self.float_candidate is None else latency_cut(self.original, self.float_candidate)

    def to_dict(self) -> dict:
        extra = {} if self.float_candidate is None else {"float_candidate_ms": self.float_candidate.to_dict(),
                                                         "float_cut": self.float_cut}
        return {**super().to_dict(), **extra, **({"given_file": self.given_file} if self.given_file else {})}


def time_given_file(ctx, backend: LatencyBackend, original_run: RunOnce) -> dict | None:
    """The input file as the user gave it, timed interleaved against the original graphprune times
    (its converted and simplified form, which the written file inherits): ``ratio`` = original /
    given. A TorchScript export's shape arithmetic left in the file can make it twice as slow as
    its simplified form on small inputs (a Swin: 0.78 ms against 0.40). None for a model not read
    from an ONNX file, or a target onnxruntime does not time; ``error`` where it cannot run it."""
    from ..backends.onnxruntime import OnnxRuntimeBackend
    from ..formats.onnx_read import read_onnx

    original = ctx.original
    path = original.onnx.path if original.source == "onnx" and original.onnx is not None else None
    if path is None or not isinstance(backend, OnnxRuntimeBackend) or not os.path.isfile(path):
        return None
    try:
        given_run = _file_runner(read_onnx(path), original, ctx, "the input file as given")
    except GraphpruneError as exc:
        return {"path": path, "error": str(exc)}
    timed, given = compare_interleaved([original_run, given_run], ctx.latency)
    return {"path": path, "ms": given.median_ms, "original_ms": timed.median_ms,
            "ratio": timed.median_ms / given.median_ms}


def _file_runner(proto, model: Model, ctx, what: str) -> RunOnce:
    """One run of an ONNX file that stands for ``model`` (its int8 form, or the file it was read
    from), on ``model``'s inputs in the file's layout, with ``ctx.latency``'s settings."""
    from ..backends.environment import batch_inputs
    from ..backends.onnxruntime import session_runner
    from ..formats.input_layout import is_channels_last

    return session_runner(proto, batch_inputs(model, ctx.latency), ctx.latency, is_channels_last(model), what)


class MeasureResult(Analysis):
    """An independent interleaved timing of the current model, in the written file's form (the
    ``QuantizedOnnx`` where a step made one, else the float model), against ``ctx.original``."""

    name = "measure_result"
    optional = (QuantizedOnnx,)
    provides = (FinalCut,)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        backend = ctx.need("backend", self.name)
        quantized = inputs.get(QuantizedOnnx)
        original_run = backend.prepare(ctx.original, ctx.latency)
        if quantized is None or quantized.proto is None:
            cut = measure_cut(backend, ctx.original, model, ctx.latency, original_run)
            final = FinalCut(cut.original, cut.candidate, cut.cut)
        else:
            runs = [original_run, backend.prepare(model, ctx.latency),
                    _file_runner(quantized.proto, model, ctx, "the quantised model")]
            original, recovered, written = compare_interleaved(runs, ctx.latency)
            final = FinalCut(original, written, latency_cut(original, written), float_candidate=recovered)
        given = time_given_file(ctx, backend, original_run)  # after the cut: its timing stays as it was
        if given and "ratio" in given:
            given["cut"] = 1.0 - (1.0 - final.cut) * given["ratio"]
        final = replace(final, given_file=given)
        return PassResult(model, record=final.to_dict(), artifacts=[final])
