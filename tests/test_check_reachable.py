"""An unreachable target is refused right after profiling (passes/check_reachable.py): which set is
measured, the line it raises, when it has nothing to check, and that no block is scored first."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
import graphprune.passes.select_blocks as select_module
from graphprune.backends import LatencySettings
from graphprune.backends.base import CutMeasurement, LatencyStats
from graphprune.data import TinySet
from graphprune.optimize import OptimizeConfig, make_context, optimize
from graphprune.passes import (CheckReachable, FindBlocks, MeasureBlockLatency, PassState, Pipeline,
                               PoolIdenticalBlocks, QuantizationPlan)
from graphprune.passes import recoverability as recoverability_module
from graphprune.passes.quantize import QuantConfig
from graphprune.passes.recover import RecoverySettings
from graphprune.passes.select_blocks import unreachable

from conftest import plain_cnn_onnx

FAST = LatencySettings(min_time_s=0.02, warmup_s=0.0, warmup_runs=1, min_runs=3)


def _cut(cut: float) -> CutMeasurement:
    stats = lambda ms: LatencyStats(median_ms=ms, p10_ms=ms, p90_ms=ms, mean_ms=ms, std_ms=0.0, runs=1)
    return CutMeasurement(stats(1.0), stats(1.0 - cut), cut)


@pytest.fixture(scope="module")
def r20():
    model = gp.load("zoo:cifar10_resnet20")
    tiny = TinySet(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 10)
    return model, tiny


def _profiled(model, tiny, target: float, plan=None) -> tuple[PassState, object]:
    """find_blocks, profile_blocks and pool_identical_blocks run for real (their savings decide the
    candidates); the state and context for check_reachable."""
    ctx = make_context(model, tiny, OptimizeConfig(latency_cut=target, quantize="none", latency=FAST, margin=0.01,
                                                   show_progress=False, cache_dir=None))
    state = PassState(model)
    if plan is not None:
        state.artifacts.put(plan)
    Pipeline([FindBlocks(), MeasureBlockLatency(), PoolIdenticalBlocks()]).run(model, ctx, state)
    return state, ctx


def _fake_measure(monkeypatch, cut: float) -> list[list[str]]:
    measured = []

    def set_measurer(model, blocks, backend, settings, cache=None, reference=None):
        return lambda names: measured.append(list(names)) or _cut(cut)

    monkeypatch.setattr(select_module, "set_measurer", set_measurer)  # what run_set_measurer builds on
    return measured


def test_every_candidate_is_dropped_at_once_and_a_short_cut_is_refused_in_one_line(r20, monkeypatch):
    model, tiny = r20
    state, ctx = _profiled(model, tiny, 0.5)
    candidates = [row.name for row in state.artifacts.get(gp.passes.BlockLatencyTable).rows if row.saved_fraction > 0]
    measured = _fake_measure(monkeypatch, 0.45)
    with pytest.raises(gp.GraphpruneError) as exc:
        Pipeline([CheckReachable()]).run(model, ctx, state)
    assert measured == [candidates] and len(candidates) >= 1
    text = str(exc.value)
    assert "\n" not in text and text.startswith("a 50% latency cut is not reachable")
    assert f"dropping all {len(candidates)} candidate blocks cuts 45.0% on this target" in text
    assert "int8 may reach it (quantize 'auto')" in text


def test_a_reachable_target_is_recorded_and_the_run_goes_on(r20, monkeypatch):
    model, tiny = r20
    state, ctx = _profiled(model, tiny, 0.5)
    _fake_measure(monkeypatch, 0.8)
    Pipeline([CheckReachable()]).run(model, ctx, state)
    record = state.records["check_reachable"]
    assert record["all_dropped_cut"] == 0.8 and record["goal"] == pytest.approx(0.51) and record["candidates"] >= 1


def test_nothing_is_checked_where_quantisation_alone_reaches_the_goal(r20, monkeypatch):
    model, tiny = r20
    plan = QuantizationPlan(None, QuantConfig(), "given", "", 0.0, [], alone=_cut(0.6))
    state, ctx = _profiled(model, tiny, 0.5, plan)
    measured = _fake_measure(monkeypatch, 0.0)
    Pipeline([CheckReachable()]).run(model, ctx, state)
    assert measured == [] and "quantisation alone reaches the target" in state.records["check_reachable"]["skipped"]


def test_optimize_refuses_an_unreachable_target_before_scoring_any_block(r20, monkeypatch):
    model, tiny = r20

    def never(*args, **kwargs):
        raise AssertionError("scored blocks for a target out of reach")

    monkeypatch.setattr(recoverability_module, "score_blocks", never)
    config = OptimizeConfig(latency_cut=0.97, quantize="none", latency=FAST, show_progress=False, cache_dir=None,
                            recovery=RecoverySettings(iterations=2, batch_size=8))
    with pytest.raises(gp.GraphpruneError, match="97% latency cut is not reachable: dropping all"):
        optimize(model, tiny, config)


def test_a_model_without_residual_blocks_reaches_check_reachable_and_is_refused_there(r20, tmp_path):
    _, tiny = r20
    config = OptimizeConfig(latency_cut=0.2, quantize="none", latency=FAST, show_progress=False, cache_dir=None)
    with pytest.raises(gp.GraphpruneError) as exc:
        optimize(gp.load(plain_cnn_onnx(tmp_path / "plain.onnx")), tiny, config)
    assert str(exc.value) == ("a 20% latency cut is not reachable: no residual blocks found in this model (nothing "
                              "to drop); int8 may reach it (quantize 'auto'); resolution may reach it (lever "
                              "'resolution': the network at a lower resolution inside the graph)")


def test_the_resolution_hint_is_given_only_where_the_network_runs_smaller(tmp_path):
    from graphprune.passes.resize_input import resolution_hint
    from conftest import export_onnx

    assert resolution_hint(gp.load(plain_cnn_onnx(tmp_path / "plain.onnx"))).startswith("; resolution may reach it")
    text_map = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    assert resolution_hint(gp.load(export_onnx(text_map, (1, 3, 32, 32), tmp_path / "map.onnx"))) == ""  # follows the size


def test_with_no_block_the_line_gives_what_int8_alone_cuts():
    text = str(unreachable(0.5, 0.505, 0, 0.3, _cut(0.3), None))
    assert text == ("a 50% latency cut is not reachable: no block of this model can be dropped for a saving on this "
                    "target; int8 quantisation alone cuts 30.0%")
