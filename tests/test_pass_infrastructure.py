"""The pass API: analyses are read-only, transforms return new models, pipelines time and log."""

from __future__ import annotations

import logging

import pytest
import torch

import graphprune as gp
from graphprune.passes import Analysis, DropBlocks, FindBlocks, PassResult, Pipeline, Step, available_passes


def test_pipeline_runs_named_steps_and_records_them(caplog):
    model = gp.load("zoo:cifar10_resnet20")
    with caplog.at_level(logging.INFO, logger="graphprune"):
        state = Pipeline([FindBlocks(), DropBlocks(["layer1.1", "layer3.2"])]).run(model)
    assert list(state.records) == ["find_blocks", "drop_blocks"]
    assert state.records["find_blocks"]["count"] == 9
    assert state.records["drop_blocks"]["dropped"] == ["layer1.1", "layer3.2"]
    assert all(r["seconds"] >= 0 for r in state.records.values())
    assert len(state.artifacts["blocks"]) == 9
    assert state.model is not model and len(gp.find_blocks(state.model)) == 7
    assert len(gp.find_blocks(model)) == 9  # the input is untouched
    assert "[find_blocks] done" in caplog.text and "[drop_blocks] done" in caplog.text


def test_an_analysis_that_mutates_is_caught():
    class Sneaky(Analysis):
        name = "sneaky"

        def run(self, model, state=None):
            with torch.no_grad():
                next(model.graph_module.parameters()).add_(1.0)
            return PassResult(model)

    with pytest.raises(RuntimeError, match="modified the model"):
        Pipeline([Sneaky()]).run(gp.load("zoo:cifar10_resnet20"))


def test_plain_callables_are_steps():
    seen = []

    def note(model, state):
        seen.append(model.name)
        return PassResult(model, record={"ok": True})

    state = Pipeline([Step("note", note)]).run(gp.load("zoo:cifar10_resnet20"))
    assert seen == ["cifar10_resnet20"] and state.records["note"]["ok"]


def test_builtin_passes_are_listed():
    passes = available_passes()
    assert passes["find_blocks"] is FindBlocks and passes["drop_blocks"] is DropBlocks
