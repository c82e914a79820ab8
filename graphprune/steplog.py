"""One way to name, time and log a step, for pipeline passes and for the rewrites a file goes
through on load alike: ``[name] start`` and ``[name] done in 0.12s`` on the ``graphprune`` logger
(shown by ``--verbose``)."""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("graphprune")


def log_start(name: str) -> None:
    log.info("[%s] start", name)


def log_done(name: str, seconds: float, changed: bool = False) -> None:
    log.info("[%s] done in %.2fs%s", name, seconds, " (changed the model)" if changed else "")


@contextlib.contextmanager
def timed_step(name: str, timings: dict[str, float] | None = None):
    """Log and time the ``with`` body as step ``name``; its seconds go into ``timings``."""
    log_start(name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(seconds, 3)
    log_done(name, seconds)
