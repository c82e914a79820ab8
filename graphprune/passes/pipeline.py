"""A pipeline: a short list of named steps, checked before anything runs, run under instruments.

    Pipeline([FindBlocks(), MeasureBlockLatency(), ...]).run(model, ctx) -> PassState

:meth:`Pipeline.check` walks the steps in order before any of them runs: every artefact a step
``requires`` must come from an earlier step (or be given to ``run``), and a type may be provided
twice only by a step that also requires it (an update); otherwise it names the step, the missing
artefact and the built-in pass that provides it.

Instruments (after TVM's pass instruments) wrap every step: ``before(step, state)`` and
``after(step, state, result, seconds)``. The defaults interrupt on a remembered Ctrl-C, log,
time (``state.timings`` and each record's ``seconds``) and check that analyses leave the model as
they found it. A step's record lands in ``state.records`` under the step's name.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import GraphpruneError
from ..interrupts import raise_if_interrupted
from ..model import Model
from ..steplog import log_done, log_start
from .base import Analysis, Artifacts, Pass, PassResult
from .context import PassContext


@dataclass
class PassState:
    """What a run leaves: the current model, the artefacts, each step's record and time, and the
    steps that changed the model (none: the result is the input as it was)."""

    model: Model
    artifacts: Artifacts = field(default_factory=Artifacts)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    changed_by: list[str] = field(default_factory=list)


@dataclass
class Step:
    """One named step: a :class:`Pass`, or any callable ``(model, ctx, inputs) -> PassResult``
    (a callable declares nothing: it sees no artefacts and provides none)."""

    name: str
    fn: Callable[[Model, PassContext, Artifacts], PassResult]

    @property
    def requires(self) -> tuple[type, ...]:
        return getattr(self.fn, "requires", ())

    @property
    def optional(self) -> tuple[type, ...]:
        return getattr(self.fn, "optional", ())

    @property
    def provides(self) -> tuple[type, ...]:
        return getattr(self.fn, "provides", ())


def graph_fingerprint(model: Model) -> str:
    """A hash of the graph's code and the weights' data pointers and versions (cheap, exact enough
    to catch an analysis that edits the graph or writes to weights in place)."""
    gm = model.graph_module
    h = hashlib.sha1(str(gm.graph).encode())
    for name, tensor in list(gm.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tensor.data_ptr()}:{tensor._version}".encode())
    return h.hexdigest()


class Instrument:
    """Hooks around every step; override what you need."""

    def before(self, step: Step, state: PassState) -> None:
        pass

    def after(self, step: Step, state: PassState, result: PassResult, seconds: float) -> None:
        pass


class CheckInterrupts(Instrument):
    """A Ctrl-C remembered during a step (see ``interrupts.py``) stops the run before the next."""

    def before(self, step, state):
        raise_if_interrupted()


class LogSteps(Instrument):
    def before(self, step, state):
        log_start(step.name)

    def after(self, step, state, result, seconds):
        log_done(step.name, seconds, result.changed)


class TimeSteps(Instrument):
    def after(self, step, state, result, seconds):
        state.timings[step.name] = seconds
        state.records[step.name]["seconds"] = round(seconds, 3)


class CheckReadOnly(Instrument):
    """An analysis must leave the model's graph and weights as it found them."""

    def __init__(self):
        self._before: dict[str, str] = {}

    def before(self, step, state):
        if isinstance(step.fn, Analysis):
            self._before[step.name] = graph_fingerprint(state.model)

    def after(self, step, state, result, seconds):
        before = self._before.pop(step.name, None)
        if before is not None and graph_fingerprint(state.model) != before:
            raise RuntimeError(f"analysis pass '{step.name}' modified the model")


def default_instruments() -> list[Instrument]:
    return [CheckInterrupts(), LogSteps(), CheckReadOnly(), TimeSteps()]


class Pipeline:
    """Runs steps in order, threading the model and artefacts through a :class:`PassState`."""

    def __init__(self, steps: list[Step | Pass], instruments: list[Instrument] | None = None):
        self.steps = [s if isinstance(s, Step) else Step(s.name, s) for s in steps]
        self.instruments = default_instruments() if instruments is None else instruments

    def check(self, given: tuple[type, ...] = ()) -> None:
        """Refuse, before anything runs, an order in which a step lacks what it requires."""
        names = [s.name for s in self.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GraphpruneError(f"pipeline has two steps named {', '.join(duplicates)}")
        provided: dict[type, str] = {kind: "the caller" for kind in given}
        for step in self.steps:
            for kind in step.requires:
                if kind not in provided:
                    raise GraphpruneError(f"pipeline step '{step.name}' requires {kind.__name__}, which no earlier "
                                          f"step provides{_provider_hint(kind)}")
            for kind in step.provides:
                if kind in provided and kind not in step.requires:
                    raise GraphpruneError(f"pipeline steps '{provided[kind]}' and '{step.name}' both provide "
                                          f"{kind.__name__}")
                provided[kind] = step.name

    def run(self, model: Model, ctx: PassContext | None = None, state: PassState | None = None) -> PassState:
        ctx = ctx if ctx is not None else PassContext(model)
        state = state or PassState(model=model)
        self.check(tuple(type(a) for a in state.artifacts.values()))
        for step in self.steps:
            if isinstance(step.fn, Pass):
                step.fn.check(model, ctx)
        for step in self.steps:
            run_step(step, ctx, state, self.instruments)
        return state


def run_step(step: Step, ctx: PassContext, state: PassState, instruments: list[Instrument]) -> PassResult:
    """Run one step on ``state`` under ``instruments`` and store what it provides."""
    for instrument in instruments:
        instrument.before(step, state)
    start = time.perf_counter()
    run = step.fn.run if isinstance(step.fn, Pass) else step.fn
    result = run(state.model, ctx, state.artifacts.view(step.requires + step.optional))
    seconds = time.perf_counter() - start
    produced = {type(a) for a in result.artifacts}
    if produced != set(step.provides):
        raise RuntimeError(f"pass '{step.name}' declared {_names(step.provides)} but returned {_names(produced)}")
    for artefact in result.artifacts:
        state.artifacts.put(artefact)
    state.records[step.name] = dict(result.record)
    state.model = result.model
    if result.changed:
        state.changed_by.append(step.name)
    for instrument in instruments:
        instrument.after(step, state, result, seconds)
    return result


def _names(kinds) -> str:
    return "{" + ", ".join(sorted(k.__name__ for k in kinds)) + "}"


def _provider_hint(kind: type) -> str:
    from .base import available_passes

    providers = [name for name, cls in available_passes().items() if kind in getattr(cls, "provides", ())]
    return f" (add {' or '.join(providers)} before it)" if providers else ""
