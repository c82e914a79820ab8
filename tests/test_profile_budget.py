"""Profiling under a time budget: every distinct block measured first, twins while time lasts."""

from __future__ import annotations

import time

import graphprune as gp
from graphprune.passes import (Artifacts, BlockLatencyTable, Blocks, MeasureBlockLatency, PassContext, PassState,
                               Pipeline, measure_block_latency)
from graphprune.passes.pool_latency import PoolIdenticalBlocks, identical_groups
from test_backends import FAST, CountingBackend
from test_pool_latency import Mixed


def _mixed():
    model = gp.load(Mixed(), input_shape=(1, 3, 16, 16))
    blocks = gp.find_blocks(model)
    return model, blocks, identical_groups(model, blocks)  # [["a0", "a1", "a2"]]


def _profile(model, blocks, twins, deadline, cache):
    order = []
    table = measure_block_latency(CountingBackend(), model, FAST, blocks, progress=False,
                                  on_block=lambda row: order.append(row.name), cache=cache, twins=twins,
                                  deadline=deadline)
    return table, order


def test_twins_come_after_every_distinct_block_and_all_are_measured_without_a_deadline():
    model, blocks, twins = _mixed()
    table, order = _profile(model, blocks, twins, None, {})
    assert order == ["a0", "k5", "d2", "a1", "a2"] and table.unmeasured == []
    assert [row.name for row in table.rows] == ["a0", "a1", "k5", "d2", "a2"]  # the blocks' order


def test_twins_past_the_deadline_take_their_group_median_and_are_measured_on_resume():
    model, blocks, twins = _mixed()
    cache = {}
    table, order = _profile(model, blocks, twins, time.monotonic(), cache)
    assert order == ["a0", "k5", "d2"]  # every distinct block, though the deadline had passed
    assert table.unmeasured == ["a1", "a2"] and "a1" not in cache and "a0" in cache
    rows = {row.name: row for row in table.rows}
    assert rows["a1"].saved_fraction == rows["a2"].saved_fraction == rows["a0"].saved_fraction
    assert table.to_dict()["unmeasured"] == ["a1", "a2"]
    resumed, order = _profile(model, blocks, twins, None, cache)
    assert order == ["a1", "a2"] and resumed.unmeasured == []


def test_the_pass_sizes_profiling_to_the_budget_and_pooling_leaves_stand_ins_out():
    model, blocks, _ = _mixed()
    ctx = PassContext(model, backend=CountingBackend(), latency=FAST, deadline=time.monotonic())  # no time left
    state = Pipeline([MeasureBlockLatency(), PoolIdenticalBlocks()]).run(
        model, ctx, PassState(model, Artifacts([Blocks(blocks)])))
    assert state.records["profile_blocks"]["time_limit"] == {"seconds": 0.0, "unmeasured_twins": 2}
    (group,) = state.records["pool_identical_blocks"]["groups"]
    measured = state.artifacts[BlockLatencyTable].saved_fractions()["a0"]
    assert group == {"blocks": ["a0", "a1", "a2"], "measured": [measured, None, None], "pooled": measured}
    unbudgeted = Pipeline([MeasureBlockLatency()]).run(model, PassContext(model, backend=CountingBackend(),
                                                                          latency=FAST),
                                                       PassState(model, Artifacts([Blocks(blocks)])))
    assert "time_limit" not in unbudgeted.records["profile_blocks"]
