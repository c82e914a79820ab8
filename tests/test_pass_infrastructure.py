"""The pass API: typed contracts checked before a run, read-only analyses, new models from
transforms, instruments around every step, a registry of every built-in pass."""

from __future__ import annotations

import logging

import pytest
import torch

import graphprune as gp
from graphprune.backends.base import LatencySettings, LatencyStats
from graphprune.passes import (Analysis, Artifacts, BlockLatencyTable, BlockRecoverabilities, Blocks, DropBlocks,
                               FindBlocks, Instrument, PassContext, PassResult, PassState, Pipeline, SelectBlocks,
                               Selection, Step, Transform, available_passes, builtin_passes)


def test_pipeline_runs_named_steps_and_records_them(caplog):
    model = gp.load("zoo:cifar10_resnet20")
    with caplog.at_level(logging.INFO, logger="graphprune"):
        state = Pipeline([FindBlocks(), DropBlocks(["layer1.1", "layer3.2"])]).run(model)
    assert list(state.records) == ["find_blocks", "drop_blocks"]
    assert state.records["find_blocks"]["count"] == 9
    assert state.records["drop_blocks"]["dropped"] == ["layer1.1", "layer3.2"]
    assert all(r["seconds"] >= 0 for r in state.records.values())
    assert len(state.artifacts[Blocks]) == 9
    assert state.model is not model and len(gp.find_blocks(state.model)) == 7
    assert len(gp.find_blocks(model)) == 9  # the input is untouched
    assert "[find_blocks] done" in caplog.text and "[drop_blocks] done" in caplog.text


def test_an_analysis_that_mutates_is_caught():
    class Sneaky(Analysis):
        name = "sneaky"

        def run(self, model, ctx, inputs):
            with torch.no_grad():
                next(model.graph_module.parameters()).add_(1.0)
            return PassResult(model)

    with pytest.raises(RuntimeError, match="modified the model"):
        Pipeline([Sneaky()]).run(gp.load("zoo:cifar10_resnet20"))


def test_plain_callables_are_steps():
    seen = []

    def note(model, ctx, inputs):
        seen.append(model.name)
        return PassResult(model, record={"ok": True})

    state = Pipeline([Step("note", note)]).run(gp.load("zoo:cifar10_resnet20"))
    assert seen == ["cifar10_resnet20"] and state.records["note"]["ok"]


def test_a_missing_artefact_is_named_before_anything_runs():
    ran = []

    class Spy(Analysis):
        name = "spy"

        def run(self, model, ctx, inputs):
            ran.append(True)
            return PassResult(model)

    with pytest.raises(gp.GraphpruneError, match="'select_blocks' requires BlockRecoverabilities.*score_recoverability"):
        Pipeline([Spy(), FindBlocks(), SelectBlocks()]).run(gp.load("zoo:cifar10_resnet20"))
    assert not ran


def test_a_second_provider_must_declare_an_update():
    class Again(Analysis):
        name = "again"
        provides = (Blocks,)

        def run(self, model, ctx, inputs):  # pragma: no cover - refused before it runs
            return PassResult(model, artifacts=[Blocks()])

    with pytest.raises(gp.GraphpruneError, match="'find_blocks' and 'again' both provide Blocks"):
        Pipeline([FindBlocks(), Again()]).check()

    class Refine(Again):  # requires what it provides: an update, allowed
        name = "refine"
        requires = (Blocks,)

        def run(self, model, ctx, inputs):
            return PassResult(model, artifacts=[Blocks(inputs[Blocks][:2])])

    state = Pipeline([FindBlocks(), Refine()]).run(gp.load("zoo:cifar10_resnet20"))
    assert [b.name for b in state.artifacts[Blocks]] == ["layer1.0", "layer1.1"]


def test_a_pass_sees_only_what_it_declared_and_must_return_what_it_provides():
    class Peek(Analysis):
        name = "peek"

        def run(self, model, ctx, inputs):
            inputs.get(Blocks)  # not declared
            return PassResult(model)

    with pytest.raises(KeyError, match="Blocks is not among"):
        Pipeline([FindBlocks(), Peek()]).run(gp.load("zoo:cifar10_resnet20"))

    class Forgetful(Analysis):
        name = "forgetful"
        provides = (Selection,)

        def run(self, model, ctx, inputs):
            return PassResult(model)

    with pytest.raises(RuntimeError, match="declared {Selection} but returned {}"):
        Pipeline([Forgetful()]).run(gp.load("zoo:cifar10_resnet20"))


def test_checks_run_before_any_step():
    ran = []

    class Early(Transform):
        name = "early"

        def run(self, model, ctx, inputs):
            ran.append(True)
            return PassResult(model)

    model = gp.load("zoo:cifar10_resnet20")  # the caller gives what SelectBlocks requires, not its target
    state = PassState(model, Artifacts([BlockRecoverabilities(), _empty_table()]))
    with pytest.raises(gp.GraphpruneError, match="'select_blocks' needs latency_cut"):
        Pipeline([Early(), FindBlocks(), SelectBlocks()]).run(model, PassContext(model), state)
    assert not ran


def _empty_table():
    return BlockLatencyTable(LatencyStats.from_samples([1.0]), [], LatencySettings(), {})


def test_instruments_wrap_every_step():
    calls = []

    class Trace(Instrument):
        def before(self, step, state):
            calls.append(("before", step.name))

        def after(self, step, state, result, seconds):
            calls.append(("after", step.name))

    Pipeline([FindBlocks(), DropBlocks(["layer1.1"])], instruments=[Trace()]).run(gp.load("zoo:cifar10_resnet20"))
    assert calls == [("before", "find_blocks"), ("after", "find_blocks"),
                     ("before", "drop_blocks"), ("after", "drop_blocks")]


def test_every_builtin_pass_is_registered():
    passes = available_passes()
    assert passes["find_blocks"] is FindBlocks and passes["drop_blocks"] is DropBlocks
    from graphprune.optimize import default_pipeline

    assert all(passes[p.name] is type(p) for p in default_pipeline())
    assert set(builtin_passes()) >= {p.name for p in default_pipeline()}
