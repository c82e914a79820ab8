"""What every pass may need and no pass owns: the run's shared settings, data, caches and progress.

The context is built once per pipeline run (``optimize`` builds it from its config) and handed to
every pass. A pass asks for what it needs with :meth:`PassContext.need`, which names the missing
setting in one line instead of failing deep inside the pass.

Time: with a ``deadline`` (``optimize``'s ``time_budget_s``), the passes whose length is theirs to
choose (int8 planning, profiling's twins, scoring's steps, refinement's joint fits, recovery's steps)
size themselves to the time left, :meth:`PassContext.stage_budget`.

Resume caches: ``ctx.cache(kind, *key_parts)`` is a :class:`~graphprune.cache.JsonCache` keyed by
the model's fingerprint plus whatever else the pass's results depend on (its settings, the data);
passes that ask with the same kind and key share one cache (``SelectBlocks`` and
``RefineSelection`` share their measured sets). Without a cache folder it lives in memory only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import LatencyBackend, LatencySettings
from ..cache import JsonCache, model_fingerprint, settings_fingerprint
from ..data import TinySet
from ..errors import GraphpruneError
from ..model import Model


@dataclass
class PassContext:
    """Shared by the passes of one run.

    ``original``: the model the run started from (the latency reference and recovery's teacher);
    ``tiny``: every image of the tiny set; ``train``/``holdout``: its split for recoverability;
    ``latency_cut`` and ``margin``: the measured goal; ``config``: the configuration the pipeline
    was built from, for passes (third-party ones too) that read their own settings there."""

    original: Model
    tiny: TinySet | None = None
    train: TinySet | None = None
    holdout: TinySet | None = None
    backend: LatencyBackend | None = None
    latency: LatencySettings = field(default_factory=LatencySettings)
    latency_cut: float | None = None
    margin: float = 0.0
    feature_node: str | None = None
    cache_dir: str | None = None
    show_progress: bool = True
    config: Any = None
    deadline: float | None = None  # time.monotonic() by which the run should be done, or None
    _caches: dict = field(default_factory=dict, repr=False)
    _model_key: str | None = field(default=None, repr=False)

    def need(self, name: str, by: str):
        """The value of setting ``name``; a one-line error naming it (and the pass) when unset."""
        value = getattr(self, name)
        if value is None:
            raise GraphpruneError(f"pass '{by}' needs {name}, which this run does not set", parameter=name)
        return value

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def stage_budget(self, own: float | None, share: float = 1.0, reserve: float = 0.0) -> float | None:
        """Seconds a stage may take: its own limit ``own`` (None: none), and with a deadline at most
        ``share`` of the time left after ``reserve`` seconds kept for the steps after it (0 when
        none is left)."""
        left = self.seconds_left()
        if left is None:
            return own
        budget = max(0.0, share * (left - reserve))
        return budget if own is None else min(own, budget)

    def cache(self, kind: str, *key_parts) -> JsonCache:
        """The resume cache ``kind`` for results that depend on the original model and ``key_parts``."""
        if self._model_key is None:
            self._model_key = model_fingerprint(self.original)
        key = settings_fingerprint(self._model_key, *key_parts)
        if (kind, key) not in self._caches:
            self._caches[kind, key] = JsonCache(self.cache_dir, kind, key)
        return self._caches[kind, key]
