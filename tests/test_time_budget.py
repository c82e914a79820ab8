"""optimize's time budget: the stages whose length is theirs to choose (refinement's joint fits,
recovery's steps) size themselves to the time left; a fake clock where time decides."""

from __future__ import annotations

import importlib
import time

import pytest
import torch

import graphprune as gp
from graphprune.data import TinySet
from graphprune.passes import PassContext, Recover, Selection
from graphprune.passes.recover import RESERVE_SECONDS, RecoverySettings
from graphprune.passes.refine_selection import RefineSettings, refine_set
from test_refine_selection import GROUPS, _scores

refine_module = importlib.import_module("graphprune.passes.refine_selection")


def test_stage_budget_is_a_share_of_the_time_left_after_a_reserve():
    model = gp.load("zoo:cifar10_resnet20")
    assert PassContext(model).stage_budget(30.0) == 30.0  # no deadline: the stage's own limit
    ctx = PassContext(model, deadline=time.monotonic() + 100.0)
    assert ctx.stage_budget(None, share=0.5, reserve=20.0) == pytest.approx(40.0, abs=0.5)
    assert ctx.stage_budget(10.0, share=0.5) == 10.0  # the smaller limit wins
    assert PassContext(model, deadline=time.monotonic() - 5).stage_budget(None) == 0.0
    with pytest.raises(gp.GraphpruneError, match="time_budget_s"):
        gp.OptimizeConfig(time_budget_s=0)


def test_refinement_stops_before_a_fit_that_would_end_past_its_limit(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(refine_module.time, "perf_counter", lambda: clock[0])

    def joint(names):  # every fit takes 10 s on the fake clock, and no move ever helps
        clock[0] += 10.0
        return 1.0

    _, evaluations = refine_set(["a0", "a1", "a2", "b0"], _scores(), GROUPS, joint, 0.135,
                                RefineSettings(max_seconds=35.0))
    # 3 fits end at 30 s; a 4th would end at 40 s > 35 s
    assert len(evaluations) == 3 and evaluations[-1]["then_stopped"] == "time limit 35 s"
    _, unlimited = refine_set(["a0", "a1", "a2", "b0"], _scores(), GROUPS, joint, 0.135, RefineSettings())
    assert len(unlimited) == 4 and "then_stopped" not in unlimited[-1]
    assert refine_set(["a0", "b0"], _scores(), GROUPS, joint, 0.0, RefineSettings(max_seconds=0.0))[1] == []


def test_recovery_takes_the_time_left_but_the_reserve():
    teacher = gp.load("zoo:cifar10_resnet20")
    pruned = gp.drop_blocks(teacher, ["layer1.1"])
    tiny = TinySet(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long))
    ctx = PassContext(teacher, tiny=tiny, show_progress=False, deadline=time.monotonic() + RESERVE_SECONDS + 0.5)
    result = Recover(RecoverySettings(iterations=100_000, batch_size=4, augment="none")).run(
        pruned, ctx, {Selection: Selection(["layer1.1"], None, [], [])})
    assert 3 < result.record["iterations_run"] < 100_000
    assert result.record["settings"]["max_seconds"] <= 0.5


def test_int8_planning_takes_its_share_of_the_time_left_and_mimicking_the_time_left_then(monkeypatch):
    """The plan's candidates get PLAN_SHARE of the time left when planning starts; quantisation-aware
    mimicking is sized when it starts, so time the candidates spent is not given to it twice."""
    from graphprune.passes import plan_quantization as planning

    seen = {}

    def fake_plan(proto, calibration, judge_images, settings, measure, labels=None, improve=None, max_seconds=None,
                  output_axes=()):
        seen["plan"] = max_seconds
        seen["mimic"] = improve.args[4]().max_seconds  # _mimicked's MimicSettings, made when it is called
        raise planning.NoCandidate("stop here")

    monkeypatch.setattr(planning, "plan_quantization", fake_plan)
    model = gp.load("zoo:cifar10_resnet20")
    tiny = TinySet(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long))
    ctx = PassContext(model, tiny=tiny, show_progress=False, backend=gp.backends.get_backend("onnxruntime"),
                      deadline=time.monotonic() + 100.0)
    plan = planning.PlanQuantization("auto").plan(ctx)
    assert plan.config is None and "stop here" in plan.reason
    assert seen["plan"] == pytest.approx(planning.PLAN_SHARE * 100.0, abs=1.0)
    assert seen["mimic"] == pytest.approx(planning.MIMIC_SHARE * 100.0, abs=1.0)


def test_scoring_gives_every_block_the_steps_that_fit_its_time():
    """A probe of 5 steps: 2 s fixed and 1 s a step. 50 steps for 6 blocks cost 312 s: with 100 s
    each block gets (100 / 6 - 2) / 1 = 14 steps; with 400 s the 50 asked. With two probes their mean
    stands for a block."""
    from graphprune.passes.scoring_budget import PROBE_STEPS, affordable_iterations

    asked = []

    def probe(steps):
        asked.append(steps)
        return 2.0 + steps * 1.0, steps * 1.0

    assert affordable_iterations(50, 6, 100.0, [probe]) == 14 and asked == [PROBE_STEPS]
    assert affordable_iterations(50, 6, 400.0, [probe]) == 50
    assert affordable_iterations(50, 6, 5.0, [probe]) == 0  # not even the fixed part fits: the drop error alone
    assert affordable_iterations(3, 6, 1.0, [probe]) == 0 and asked[-1] == 3  # never more steps than asked

    def cheap(steps):  # a late block: 1 s fixed, 0.5 s a step; the mean block costs 1.5 + 0.75 a step
        return 1.0 + steps * 0.5, steps * 0.5

    assert affordable_iterations(50, 6, 100.0, [probe, cheap]) == int((100 / 6 - 1.5) / 0.75)


def test_scoring_under_a_time_limit_scores_every_block_with_the_same_fewer_steps(monkeypatch):
    """score_blocks with max_seconds: the probe's measure decides the steps; every block gets them,
    the result's settings say so, and the cache (kept for the steps asked) is neither read nor written."""
    from graphprune.passes import recoverability
    from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks

    model = gp.load("zoo:cifar10_resnet20")
    blocks = gp.find_blocks(model)[:3]
    train = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    holdout = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    monkeypatch.setattr(recoverability, "affordable_iterations", lambda iterations, blocks, seconds, probe: 2)
    cache = {}
    settings = RecoverabilitySettings(iterations=20, batch_size=8)
    scores = score_blocks(model, blocks, train, holdout, settings, show_progress=False, cache=cache, max_seconds=10.0)
    assert scores.settings.iterations == 2 and len(scores) == 3 and cache == {}
    unlimited = score_blocks(model, blocks, train, holdout, settings, show_progress=False, cache=cache)
    assert unlimited.settings == settings and len(cache) == 3
    assert [s.before_fit for s in scores] == pytest.approx([s.before_fit for s in unlimited])


def test_the_report_says_when_scoring_took_fewer_steps_than_asked():
    from graphprune.optimize import _scoring_steps
    from graphprune.passes.recoverability import BlockRecoverabilities, RecoverabilitySettings

    config = gp.OptimizeConfig()
    asked = config.recoverability
    assert _scoring_steps(BlockRecoverabilities([], asked), config) is None and _scoring_steps(None, config) is None
    fewer = BlockRecoverabilities([], RecoverabilitySettings(iterations=7))
    assert _scoring_steps(fewer, config) == {"asked": asked.iterations, "used": 7}


def test_a_time_limit_that_fits_leaves_every_score_as_it_was():
    """The probes run their own steps; the blocks are then scored exactly as without a limit."""
    from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks

    model = gp.load("zoo:cifar10_resnet20")
    blocks = gp.find_blocks(model)[:3]
    train = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    holdout = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    settings = RecoverabilitySettings(iterations=10, batch_size=8)
    limited = score_blocks(model, blocks, train, holdout, settings, show_progress=False, max_seconds=1e6)
    unlimited = score_blocks(model, blocks, train, holdout, settings, show_progress=False)
    assert limited.settings == settings
    assert [s.recoverability for s in limited] == [s.recoverability for s in unlimited]


def test_scoring_at_no_step_takes_the_drop_error_and_fits_no_adaptor(monkeypatch):
    """A budget's 0 steps: the adaptors would stay the identity, so the score is the held-out error
    of the block simply gone, with no adaptor built nor prefix cached (MaxViT-T at 224 px: 4.6 s a
    block instead of 11.5)."""
    from graphprune.passes import recoverability
    from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks

    model = gp.load("zoo:cifar10_resnet20")
    blocks = gp.find_blocks(model)[:3]
    train = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    holdout = TinySet(torch.randn(16, 3, 32, 32), torch.full((16,), -1))
    identity = score_blocks(model, blocks, train, holdout, RecoverabilitySettings(iterations=1, lr=0.0),
                            show_progress=False)  # one step that moves nothing: the identity adaptors fitted
    monkeypatch.setattr(recoverability._Context, "_practise", lambda *args: pytest.fail("fitted adaptors"))
    scores = score_blocks(model, blocks, train, holdout, RecoverabilitySettings(iterations=0), show_progress=False)
    assert [s.recoverability for s in scores] == [s.before_fit for s in scores]
    assert [s.recoverability for s in scores] == pytest.approx([s.recoverability for s in identity], rel=1e-5)
    assert all(s.recoverability > 0 for s in scores)
