"""The latency backend interface: measure a model on the user's target, honestly.

A backend turns a :class:`~graphprune.model.Model` into a zero-argument callable that runs one
batch on the target (:meth:`LatencyBackend.prepare`). Everything else is shared here:

* :func:`time_runs` warms up (by count and by time), then repeats until both a minimum count and a
  minimum time are reached, and summarises the per-run times (median, p10, p90, mean, std).
* :func:`compare_interleaved` times several prepared models in rounds (A B A B ...), so slow drift
  of the machine (thermal, other load) affects all of them alike; comparisons (a latency *cut*)
  are only ever made between models timed in one interleaved run.

The median is the statistic to quote: per-run times are skewed by occasional interruptions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from ..errors import GraphpruneError
from ..model import Model


@dataclass(frozen=True)
class LatencySettings:
    """Where and how to measure. ``min_runs``/``min_time_s`` bound each measurement from below."""

    batch_size: int = 1
    threads: int = 1
    device: str = "cpu"
    warmup_runs: int = 3
    warmup_s: float = 0.1
    min_runs: int = 10
    min_time_s: float = 0.5
    max_runs: int = 100_000

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-run wall times, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "LatencyStats":
        if not samples_ms:
            raise ValueError("no timing samples")
        ordered = sorted(samples_ms)
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=_quantile(ordered, 0.10),
            p90_ms=_quantile(ordered, 0.90),
            mean_ms=statistics.fmean(ordered),
            std_ms=statistics.pstdev(ordered) if len(ordered) > 1 else 0.0,
            runs=len(ordered),
            samples_ms=tuple(samples_ms),
        )

    def to_dict(self) -> dict:
        return {"median": self.median_ms, "p10": self.p10_ms, "p90": self.p90_ms,
                "mean": self.mean_ms, "std": self.std_ms, "runs": self.runs}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyStats":
        """The inverse of :meth:`to_dict` (samples are not kept)."""
        return cls(d["median"], d["p10"], d["p90"], d["mean"], d["std"], d["runs"])


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted data."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


RunOnce = Callable[[], None]


class LatencyBackend(Protocol):
    """One target (runtime + device). Implementations live one per file in this package."""

    name: str

    def prepare(self, model: Model, settings: LatencySettings) -> RunOnce:
        """Build whatever runs ``model`` on the target and return a callable that runs one batch
        (and, for asynchronous devices, waits for it to finish). Raise
        :class:`~graphprune.errors.GraphpruneError` when the device or provider is unavailable."""
        ...

    def describe(self, settings: LatencySettings) -> dict:
        """Backend, device, provider, threads and library versions, recorded with every result."""
        ...


def time_runs(run: RunOnce, settings: LatencySettings, clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Warm up, then time ``run`` until ``min_runs`` and ``min_time_s`` are both reached."""
    _warm_up(run, settings, clock)
    samples: list[float] = []
    start = clock()
    while len(samples) < settings.max_runs:
        t0 = clock()
        run()
        samples.append((clock() - t0) * 1e3)
        if len(samples) >= settings.min_runs and clock() - start >= settings.min_time_s:
            break
    return LatencyStats.from_samples(samples)


def _warm_up(run: RunOnce, settings: LatencySettings, clock) -> None:
    start, count = clock(), 0
    while count < settings.warmup_runs or clock() - start < settings.warmup_s:
        run()
        count += 1


def compare_interleaved(runs: list[RunOnce], settings: LatencySettings,
                        clock: Callable[[], float] = time.perf_counter,
                        on_round: Callable[[int], None] | None = None) -> list[LatencyStats]:
    """Time several prepared models in alternation (A B A B ...) and summarise each.

    Every model is warmed up first; then rounds run each model once, in order, until every model
    has ``min_runs`` samples and the rounds together took ``min_time_s`` times the number of
    models. ``on_round(k)`` is called after round ``k`` (progress bars).
    """
    if not runs:
        return []
    for run in runs:
        _warm_up(run, settings, clock)
    samples: list[list[float]] = [[] for _ in runs]
    start = clock()
    budget = settings.min_time_s * len(runs)
    rounds = 0
    while rounds < settings.max_runs:
        for run, bucket in zip(runs, samples):
            t0 = clock()
            run()
            bucket.append((clock() - t0) * 1e3)
        rounds += 1
        if on_round is not None:
            on_round(rounds)
        if rounds >= settings.min_runs and clock() - start >= budget:
            break
    return [LatencyStats.from_samples(s) for s in samples]


@dataclass(frozen=True)
class CutMeasurement:
    """An original and a candidate timed in one interleaved run; ``cut`` = 1 - candidate/original."""

    original: LatencyStats
    candidate: LatencyStats
    cut: float

    @property
    def saved_ms(self) -> float:
        return self.original.median_ms - self.candidate.median_ms

    def to_dict(self) -> dict:
        return {"original_ms": self.original.to_dict(), "candidate_ms": self.candidate.to_dict(),
                "cut": self.cut, "saved_ms": self.saved_ms}

    @classmethod
    def from_dict(cls, d: dict) -> "CutMeasurement":
        return cls(LatencyStats.from_dict(d["original_ms"]), LatencyStats.from_dict(d["candidate_ms"]), d["cut"])



def latency_cut(original: LatencyStats, candidate: LatencyStats) -> float:
    """Fraction of the original's median latency that the candidate saves."""
    return 1.0 - candidate.median_ms / original.median_ms


def get_backend(name: str) -> LatencyBackend:
    """A backend by name: ``onnxruntime`` or ``torch``."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "torch":
        from .torch_eager import TorchEagerBackend

        return TorchEagerBackend()
    raise GraphpruneError(f"unknown backend '{name}': use onnxruntime or torch")
