"""Pass contracts: analyses, transforms, the artefacts they exchange, and what they return.

Invariants:
* A pass declares, by type, the artefacts it ``requires`` (must exist before it runs), may read
  (``optional``) and ``provides`` (exist after it). It sees only the artefacts it declared
  (:class:`Artifacts` is a read-only view), so a dependency cannot hide in a string-keyed dict.
  A pass that provides a type it also requires *updates* it (``RefineSelection`` refines the
  ``Selection``); any other second provider of a type is refused by :meth:`Pipeline.check`.
* An :class:`Analysis` reads a model and returns values; it never changes the graph or weights
  (checked by :class:`~graphprune.passes.pipeline.CheckReadOnly`).
* A :class:`Transform` returns a *new* :class:`~graphprune.model.Model` (the input is untouched),
  whether it changed anything, and a JSON-able record for the report.
* What every pass may need but no pass owns (backend, latency settings, target, the tiny set and its
  split, resume caches, progress) comes from the :class:`~graphprune.passes.context.PassContext`.

Passes are registered by name (:func:`available_passes`): the built-ins plus those of the
``graphprune.passes`` entry-point group, so ``optimize --passes`` can name a third-party pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Iterable

from ..model import Model

if TYPE_CHECKING:
    from .context import PassContext

log = logging.getLogger("graphprune")


class Artifacts:
    """Artefacts keyed by their exact type. A pass gets a view restricted to the types it declared;
    putting an artefact of a type already held replaces it (an update)."""

    def __init__(self, items: Iterable[Any] = (), allowed: Iterable[type] | None = None):
        self._allowed = None if allowed is None else frozenset(allowed)
        self._items: dict[type, Any] = {}
        for item in items:
            self._items[type(item)] = item

    def _check(self, kind: type) -> None:
        if self._allowed is not None and kind not in self._allowed:
            raise KeyError(f"{kind.__name__} is not among the artefacts this pass declared")

    def get(self, kind: type, default=None):
        self._check(kind)
        return self._items.get(kind, default)

    def __getitem__(self, kind: type):
        self._check(kind)
        if kind not in self._items:
            raise KeyError(f"no {kind.__name__} artefact")
        return self._items[kind]

    def __contains__(self, kind: type) -> bool:
        return kind in self._items

    def put(self, item: Any) -> None:
        self._items[type(item)] = item

    def view(self, kinds: Iterable[type]) -> "Artifacts":
        view = Artifacts(allowed=kinds)
        view._items = {k: v for k, v in self._items.items() if k in view._allowed}
        return view

    def values(self) -> list:
        return list(self._items.values())


@dataclass
class PassResult:
    """What one pass produced: the (possibly new) model, whether it changed, a report record and
    the artefacts it provides (one object per type in its ``provides``)."""

    model: Model
    changed: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)

    @property
    def value(self) -> Any:
        """The single artefact of a pass that provides one (convenient from Python)."""
        return self.artifacts[0] if len(self.artifacts) == 1 else None


class Pass:
    """Base class. Subclasses set ``name``, declare ``requires``/``optional``/``provides`` and
    implement :meth:`run`. A pass constructed with no arguments uses its settings' defaults; one
    whose settings live in a field of :class:`~graphprune.optimize.OptimizeConfig` names it in
    ``config_field`` (its constructor takes them), so ``optimize --passes`` builds it from the config."""

    name: str = "pass"
    requires: tuple[type, ...] = ()
    optional: tuple[type, ...] = ()
    provides: tuple[type, ...] = ()
    config_field: str | None = None

    def run(self, model: Model, ctx: "PassContext", inputs: Artifacts) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def check(self, model: Model, ctx: "PassContext") -> None:
        """Refuse, in one line, settings this pass would refuse; a pipeline calls every step's
        check before running any, so a bad setting does not cost the steps before it."""

    @classmethod
    def from_config(cls, config) -> "Pass":
        return cls(getattr(config, cls.config_field)) if cls.config_field else cls()

    def __call__(self, model: Model, ctx: "PassContext | None" = None, *artifacts: Any) -> PassResult:
        """Run on its own: ``FindBlocks()(model)``, ``DropBlocks()(model, ctx, selection)``."""
        from .context import PassContext

        ctx = ctx if ctx is not None else PassContext(model)
        inputs = Artifacts(artifacts).view(self.requires + self.optional)
        missing = [kind.__name__ for kind in self.requires if kind not in inputs]
        if missing:
            raise TypeError(f"pass '{self.name}' needs {', '.join(missing)}")
        self.check(model, ctx)
        return self.run(model, ctx, inputs)


class Analysis(Pass):
    """Computes values from a model; never mutates it."""


class Transform(Pass):
    """Returns a new model; the input model is left as it was."""


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
