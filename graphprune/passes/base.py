"""Pass infrastructure: analyses, transforms, and a pipeline that times and logs them.

Invariants:
* An :class:`Analysis` reads a model and returns a value; it never changes the graph or weights.
  :class:`Pipeline` checks this by fingerprinting the graph before and after.
* A :class:`Transform` returns a *new* :class:`~graphprune.model.Model` (the input is untouched),
  whether it changed anything, and a JSON-able record for the report.
* A pipeline is a short list of named steps that share a :class:`PassState`; each step is timed
  and logged, and its record lands in ``state.records`` under the step's name.

Third-party passes register under the ``graphprune.passes`` entry-point group and are listed by
:func:`available_passes`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from ..interrupts import raise_if_interrupted
from ..model import Model

log = logging.getLogger("graphprune")


@dataclass
class PassResult:
    """What one pass produced: the (possibly new) model, whether it changed, a report record and,
    for analyses, the value computed."""

    model: Model
    changed: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    value: Any = None


@dataclass
class PassState:
    """What the steps of a pipeline share: the current model, named artefacts and records."""

    model: Model
    artifacts: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name`` and implement :meth:`run`."""

    name: str = "pass"

    def run(self, model: Model, state: PassState | None = None) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model: Model, state: PassState | None = None) -> PassResult:
        return self.run(model, state)


class Analysis(Pass):
    """Computes a value from a model; never mutates it. The value is stored under ``provides``."""

    provides: str = ""


class Transform(Pass):
    """Returns a new model; the input model is left as it was."""


def graph_fingerprint(model: Model) -> str:
    """A hash of the graph's code and the weights' data pointers and versions (cheap, exact enough
    to catch an analysis that edits the graph or writes to weights in place)."""
    gm = model.graph_module
    h = hashlib.sha1(str(gm.graph).encode())
    for name, tensor in list(gm.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tensor.data_ptr()}:{tensor._version}".encode())
    return h.hexdigest()


@dataclass
class Step:
    """One named step of a pipeline: a pass, or any callable ``(model, state) -> PassResult``."""

    name: str
    fn: Callable[[Model, PassState], PassResult]


class Pipeline:
    """Runs steps in order, threading the model and artefacts through a :class:`PassState`."""

    def __init__(self, steps: list[Step | Pass]):
        self.steps = [s if isinstance(s, Step) else Step(s.name, s) for s in steps]

    def run(self, model: Model, state: PassState | None = None) -> PassState:
        state = state or PassState(model=model)
        for step in self.steps:
            run_step(step, state)
        return state


def run_step(step: Step, state: PassState) -> PassResult:
    """Run one step on ``state``: time it, log it, check analyses are read-only, store its outputs."""
    raise_if_interrupted()
    before = graph_fingerprint(state.model) if isinstance(step.fn, Analysis) else None
    log.info("[%s] start", step.name)
    start = time.perf_counter()
    result = step.fn(state.model, state)
    elapsed = time.perf_counter() - start
    if before is not None and graph_fingerprint(state.model) != before:
        raise RuntimeError(f"analysis pass '{step.name}' modified the model")
    state.timings[step.name] = elapsed
    record = dict(result.record)
    record["seconds"] = round(elapsed, 3)
    state.records[step.name] = record
    if isinstance(step.fn, Analysis) and step.fn.provides:
        state.artifacts[step.fn.provides] = result.value
    state.model = result.model
    log.info("[%s] done in %.2fs%s", step.name, elapsed, " (changed the model)" if result.changed else "")
    return result


def available_passes() -> dict[str, type[Pass]]:
    """Built-in passes plus those registered under the ``graphprune.passes`` entry-point group."""
    from . import builtin_passes

    passes = dict(builtin_passes())
    for entry in metadata.entry_points(group="graphprune.passes"):
        try:
            passes[entry.name] = entry.load()
        except Exception as exc:  # a broken plug-in must not break graphprune
            log.warning("could not load pass plug-in %s: %s", entry.name, exc)
    return passes
