"""Recording (graphprune/passes/recording.py): the original's values at named nodes, one pass per
split for every planned key, within a memory share, freed once every key naming them is done."""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.features import run_batched, truncate
from graphprune.graph_stats import node_stats
from graphprune.passes import recording
from graphprune.passes.recording import Recording


def _recording():
    model = gp.load("zoo:cifar10_resnet20")
    images = {"train": torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              "holdout": torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    shapes = {name: s.shape for name, s in node_stats(model).items()}
    return model, gp.find_blocks(model), Recording(model.graph_module, images, shapes)


def test_one_pass_records_every_planned_value_as_the_original_computes_it(monkeypatch):
    model, blocks, rec = _recording()
    for block in blocks:
        rec.plan(block.name, {"holdout": [block.entry], "train": [block.exit]})
    passes = []
    real = recording.run_batched
    monkeypatch.setattr(recording, "run_batched", lambda gm, x: passes.append(len(x)) or real(gm, x))
    for block in blocks:
        (value,) = rec.values("holdout", [block.entry])
        assert torch.equal(value, run_batched(truncate(model.graph_module, block.entry), rec.images["holdout"]))
    assert passes == [6] and set(rec.recorded["holdout"]) == {b.entry for b in blocks}  # train: not yet asked
    rec.plan(blocks[0].name, {"holdout": [blocks[0].entry]})  # planned again: counted once
    rec.done(blocks[0].name)
    assert blocks[0].entry not in rec.recorded["holdout"] and blocks[1].entry in rec.recorded["holdout"]
    for block in blocks[1:]:
        rec.done(block.name)
    assert not rec.recorded["holdout"] and not rec.planned["train"] and not rec.named_by


def test_no_room_records_a_cut_at_a_time(monkeypatch):
    model, blocks, rec = _recording()
    for block in blocks:
        rec.plan(block.name, {"holdout": [block.entry]})
    monkeypatch.setattr(recording, "RECORD_MEMORY_SHARE", 0.0)
    for block in blocks[:3]:
        rec.values("holdout", [block.entry])
        assert set(rec.recorded["holdout"]) <= {b.entry for b in blocks[:3]}
    assert len(rec.recorded["holdout"]) == 3  # one each, none ahead
