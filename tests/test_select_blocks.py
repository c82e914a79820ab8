"""Selection to a measured latency goal: blocks are added in order until the measured cut reaches
the goal, then every block the set does not need is given back (structural: which blocks, which
sets are measured; numerical: a real onnxruntime measurement of the chosen set reaches the goal)."""

from __future__ import annotations

import pytest

import graphprune as gp
import graphprune.passes.select_blocks as select_module
from graphprune.backends.base import LatencySettings, LatencyStats, get_backend
from graphprune.passes.measure_latency import CutMeasurement
from graphprune.passes.select_blocks import BlockScore, select_blocks


@pytest.fixture(scope="module")
def resnet20():
    model = gp.load("zoo:cifar10_resnet20")
    return model, gp.find_blocks(model)


def _stats(ms: float) -> LatencyStats:
    return LatencyStats(median_ms=ms, p10_ms=ms, p90_ms=ms, mean_ms=ms, std_ms=0.0, runs=1)


@pytest.fixture
def costed(monkeypatch):
    """Measurements from a cost table: a set's cut is the sum of its blocks' costs; records every
    set measured."""
    measured: list[list[str]] = []
    costs: dict[str, float] = {}

    class Backend:
        name = "costed"

        def prepare(self, model, settings):
            return lambda: None

    def measure_cut(backend, model, candidate, settings, original_run=None):
        measured.append(candidate)
        cut = sum(costs[n] for n in candidate)
        return CutMeasurement(_stats(1.0), _stats(1.0 - cut), cut)

    monkeypatch.setattr(select_module, "drop_blocks", lambda model, names, blocks: list(names))
    monkeypatch.setattr(select_module, "measure_cut", measure_cut)
    return Backend(), costs, measured


def _scores(costs: dict[str, float]) -> list[BlockScore]:
    return [BlockScore(n, 0.1, c, c, 0.1 / c) for n, c in costs.items()]


def test_a_block_the_goal_no_longer_needs_is_given_back(resnet20, costed):
    model, blocks = resnet20
    backend, costs, measured = costed
    costs.update({"layer2.2": 0.10, "layer2.1": 0.11, "layer1.0": 0.12})
    order = ["layer2.2", "layer2.1", "layer1.0"]
    selection = select_blocks(model, blocks, _scores(costs), 0.22, backend, LatencySettings(), 0.005, order=order)
    # 0.21 falls short, all three overshoot (0.33); without layer2.1 the set cuts 0.22, still short of
    # the 0.225 goal, so it stays; without layer2.2 it cuts 0.23: layer2.2 is given back
    assert measured == [order[:2], order, ["layer2.2", "layer1.0"], ["layer2.1", "layer1.0"]]
    assert selection.blocks == ["layer2.1", "layer1.0"]
    assert selection.cut.cut == pytest.approx(0.23)
    assert selection.measurements[-1] == {"blocks": 2, "without": "layer2.2", "measured_cut": pytest.approx(0.23)}


def test_a_set_without_surplus_costs_no_extra_measurement(resnet20, costed):
    model, blocks = resnet20
    backend, costs, measured = costed
    costs.update({"layer1.0": 0.08, "layer1.1": 0.08, "layer1.2": 0.08})
    selection = select_blocks(model, blocks, _scores(costs), 0.22, backend, LatencySettings(), 0.005,
                              order=["layer1.0", "layer1.1", "layer1.2"])
    assert selection.blocks == ["layer1.0", "layer1.1", "layer1.2"]
    assert measured == [["layer1.0", "layer1.1", "layer1.2"]]  # 0.24 - 0.08 is too far below the goal to try


def test_with_int8_a_block_saves_its_share_of_what_quantisation_left(resnet20, costed, monkeypatch):
    """int8 alone cut 48.6% of a 50% target: counted from 0, three blocks (each 20% of the float
    model) went in before the first measurement (79.7%), trimmed to two (67.8%); one reaches it."""
    model, blocks = resnet20
    backend, costs, measured = costed
    costs.update({"layer1.0": 0.2, "layer1.1": 0.2, "layer1.2": 0.2})
    alone = 0.486

    def measure_cut(backend, model, candidate, settings, original_run=None):
        measured.append(candidate)
        cut = 1 - (1 - alone) * (1 - sum(costs[n] for n in candidate))
        return CutMeasurement(_stats(1.0), _stats(1.0 - cut), cut)

    monkeypatch.setattr(select_module, "measure_cut", measure_cut)
    selection = select_blocks(model, blocks, _scores(costs), 0.5, backend, LatencySettings(), 0.005,
                              order=list(costs), alone=CutMeasurement(_stats(1.0), _stats(1 - alone), alone))
    assert selection.blocks == ["layer1.0"] and measured == [["layer1.0"]]
    assert selection.cut.cut == pytest.approx(1 - 0.514 * 0.8)


def test_the_last_block_added_is_given_back_where_the_set_before_it_was_not_measured(resnet20, costed,
                                                                                       monkeypatch):
    """Savings that do not add up (here a set saves 1.4 x the sum of its blocks'): the set before
    the last block was predicted short and not measured, yet measures at the goal."""
    model, blocks = resnet20
    backend, costs, measured = costed
    costs.update({"layer1.0": 0.10, "layer1.1": 0.06, "layer1.2": 0.04})

    def measure_cut(backend, model, candidate, settings, original_run=None):
        measured.append(candidate)
        cut = 1.4 * sum(costs[n] for n in candidate)
        return CutMeasurement(_stats(1.0), _stats(1.0 - cut), cut)

    monkeypatch.setattr(select_module, "measure_cut", measure_cut)
    selection = select_blocks(model, blocks, _scores(costs), 0.2, backend, LatencySettings(), 0.005,
                              order=list(costs))
    assert measured == [list(costs), ["layer1.0", "layer1.1"]]  # predicted 0.16 and 0.20; measured 0.224
    assert selection.blocks == ["layer1.0", "layer1.1"]


def test_an_unreachable_goal_is_an_error(resnet20, costed):
    model, blocks = resnet20
    backend, costs, _ = costed
    costs.update({"layer1.0": 0.05, "layer1.1": 0.05})
    with pytest.raises(gp.GraphpruneError, match="not reachable.*cuts 10.0%.*quantize 'auto'"):
        select_blocks(model, blocks, _scores(costs), 0.4, backend, LatencySettings(), order=["layer1.0", "layer1.1"])
    with pytest.raises(gp.GraphpruneError, match=r"cuts 10.0%.*int8 was left off \(no candidate stays"):
        select_blocks(model, blocks, _scores(costs), 0.4, backend, LatencySettings(), order=["layer1.0", "layer1.1"],
                      int8_off="no candidate stays within the accuracy bound")
    # all blocks reach the target but not the margin above it: the line says so
    with pytest.raises(gp.GraphpruneError, match=r"cuts 10.0% on this target, short of 10.5% \(the target plus"):
        select_blocks(model, blocks, _scores(costs), 0.1, backend, LatencySettings(), 0.005,
                      order=["layer1.0", "layer1.1"])


def test_the_unreachable_line_says_quantize_int8_takes_what_auto_refused_for_accuracy():
    from graphprune.passes.quantize import QuantConfig
    from graphprune.passes.quantize_plan import Candidate, QuantizationPlan, Timing

    refused = ("no candidate stays within the accuracy bound (map50_drop 0.05; the closest, qdq-u8s8, 0.162 at a "
               "cut of 53.9%); auto leaves quantisation off")
    faster = Candidate(QuantConfig(), Timing(0.539), 0.03, loss=0.162)
    line = select_module.int8_off_reason(QuantizationPlan(None, None, refused, "map50_drop", 0.05, [faster]))
    assert line == refused.split("; auto")[0] + "; quantize 'int8' takes it anyway"
    slower = Candidate(QuantConfig(), Timing(-0.1), 0.03, loss=0.0)
    no_faster = "every candidate measured no faster than the float model; auto leaves quantisation off"
    assert select_module.int8_off_reason(QuantizationPlan(None, None, no_faster, "", 0.05, [slower])) == no_faster.split("; auto")[0]
    assert select_module.int8_off_reason(None) is None


def test_a_real_measurement_of_the_chosen_set_reaches_the_goal(resnet20):
    model, blocks = resnet20
    backend = get_backend("onnxruntime")
    settings = LatencySettings(min_runs=5, min_time_s=0.05, warmup_s=0.0)
    names = [b.name for b in blocks]
    scores = [BlockScore(n, 0.1, 0.1, 0.1, 1.0) for n in names]
    selection = select_blocks(model, blocks, scores, 0.15, backend, settings, order=names)
    assert selection.cut.cut >= 0.15 and 1 <= len(selection.blocks) < len(names)
