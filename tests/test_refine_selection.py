"""Refining the greedy block set by joint recoverability: the moves (structural), the search, and
what the joint estimate computes on real weights (numerical)."""

from __future__ import annotations

import pytest

import graphprune as gp
from conftest import data_path
from graphprune.data import Preprocessing, load_tiny_set, split_holdout
from graphprune.passes.recoverability import (BlockRecoverabilities, BlockRecoverability, RecoverabilitySettings,
                                             score_blocks, set_scorer)
from graphprune.passes.refine_selection import RefineSettings, candidate_moves, first_fit_too_long, refine_set
from graphprune.passes.select_blocks import BlockScore

# two groups of identical blocks (a*, b*) and one block without a twin (t)
GROUPS = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
SAVED = {"a0": 0.04, "a1": 0.04, "a2": 0.04, "b0": 0.04, "b1": 0.04, "b2": 0.04, "t": 0.02}
REC = {"a0": 0.1, "a1": 0.2, "a2": 0.3, "b0": 0.4, "b1": 0.5, "b2": 0.6, "t": 0.05}


def _scores(rec=REC, saved=SAVED):
    return sorted((BlockScore(n, rec[n], saved[n], 10 * saved[n], rec[n] / saved[n]) for n in rec),
                  key=lambda s: s.score)


def test_moves_swap_the_worst_chosen_for_the_best_unchosen_of_another_group():
    moves = candidate_moves(["a0", "a1", "a2", "b0"], _scores(), GROUPS, min_predicted=0.155)
    # out of group a: its worst chosen (a2); in from group b: its best unchosen (b1). The set saves
    # 0.16; t saves 0.02 less than any a or b block, so a swap for t falls below 0.155 and the
    # best-scored other unchosen block (b1) is added to it
    assert moves == [("b0", ["t", "b1"]), ("a2", ["b1"]), ("a2", ["t", "b1"])]
    wide = candidate_moves(["a0", "a1", "a2", "b0"], _scores(), GROUPS, min_predicted=0.135)
    assert wide == [("b0", ["t"]), ("a2", ["t"]), ("a2", ["b1"])]  # smallest rise in summed recoverability first
    assert candidate_moves(["a0", "b0"], _scores(), GROUPS, min_predicted=0.5) == []  # unreachable


def test_search_leaves_a_set_that_empties_a_group_when_that_fits_badly():
    calls = []

    def joint(names):  # emptying group a costs far more than the singles add up to
        calls.append(tuple(sorted(names)))
        left = 3 - sum(n.startswith("a") for n in names)
        return sum(REC[n] for n in names) + (5.0 if left == 0 else 0.0)

    cache = {}
    refined, evaluations = refine_set(["a0", "a1", "a2", "b0"], _scores(), GROUPS, joint, 0.155, RefineSettings(),
                                      cache)
    assert sorted(refined) == ["a0", "a1", "b0", "b1"]
    assert evaluations[0]["joint_recoverability"] > evaluations[-1]["joint_recoverability"]
    accepted = [e["blocks"] for e in evaluations if e.get("accepted")]
    assert [sorted(b) for b in accepted] == [["a0", "a1", "b0", "b1"]]  # after trying b0 -> t + b1 first
    # a rerun with the cache fits nothing again and makes the same choice
    count = len(calls)
    again, _ = refine_set(["a0", "a1", "a2", "b0"], _scores(), GROUPS, joint, 0.155, RefineSettings(), cache)
    assert again == refined and len(calls) == count


def test_search_respects_its_budget_and_noise_margin():
    def flat(names):  # every set fits alike up to noise smaller than min_gain
        return 1.0 - 0.001 * len([n for n in names if n.startswith("b")])

    refined, evaluations = refine_set(["a0", "a1", "a2", "b0"], _scores(), GROUPS, flat, 0.135, RefineSettings())
    assert sorted(refined) == ["a0", "a1", "a2", "b0"] and len(evaluations) == 4  # the start and 3 moves
    budget = RefineSettings(max_evaluations=1)
    assert len(refine_set(["a0", "b0"], _scores(), GROUPS, flat, 0.0, budget)[1]) == 1
    assert refine_set(["a0", "b0"], _scores(), GROUPS, flat, 0.0, RefineSettings(max_evaluations=0)) == \
        (["a0", "b0"], [])


@pytest.fixture(scope="module")
def pretrained_r20():
    return gp.load("zoo:cifar10_resnet20", weights=str(data_path("cifar10-resnet-akamaster", "resnet20-12fca82f.th")))


def test_joint_recoverability_on_real_weights(pretrained_r20):
    tiny = load_tiny_set(data_path("cifar10", "train_lossless_4000.npz"), Preprocessing((3, 32, 32)), 96, seed=1)
    train, holdout = split_holdout(tiny)
    blocks = gp.find_blocks(pretrained_r20)
    settings = RecoverabilitySettings(iterations=10, batch_size=32)
    joint = set_scorer(pretrained_r20, blocks, train, holdout, settings)
    # one block: exactly the single-block estimate (same adaptors, same steps, same batches)
    single = score_blocks(pretrained_r20, blocks, train, holdout, settings, show_progress=False,
                          candidates=["layer2.1"])[0]
    assert joint(["layer2.1"]) == pytest.approx(single.recoverability, rel=1e-5)
    # a set across two stages: adaptors in both fit together, and they help
    none = set_scorer(pretrained_r20, blocks, train, holdout, RecoverabilitySettings(iterations=0))
    pair = ["layer1.1", "layer2.1"]
    assert 0 < joint(pair) < none(pair)
    assert none(pair) > none(["layer2.1"])  # losing two blocks costs more than one


def test_joint_fits_take_their_own_step_count():
    from graphprune.passes.refine_selection import joint_scoring

    scoring = RecoverabilitySettings(iterations=50, lr=0.003)
    assert joint_scoring(scoring, RefineSettings()).iterations == RefineSettings().joint_iterations == 200
    assert joint_scoring(scoring, RefineSettings(joint_iterations=None)).iterations == 50
    assert joint_scoring(scoring, RefineSettings(joint_iterations=7)) == RecoverabilitySettings(iterations=7, lr=0.003)


def test_refinement_does_not_start_a_joint_fit_it_cannot_finish_in_its_time():
    """A fit cannot stop halfway and later fits are timed on earlier ones, so the first is estimated
    from scoring's seconds a block, scaled by the steps (YOLOv8n: one 291 s fit with about 100 s to
    spend left recovery 42 s)."""
    def scored(*seconds):
        return BlockRecoverabilities([BlockRecoverability(f"b{i}", 1.0, 1.0, 1.0, s) for i, s in enumerate(seconds)],
                                     RecoverabilitySettings(iterations=50))

    joint = RecoverabilitySettings(iterations=200)
    assert "about 328 s" in first_fit_too_long(scored(80.0, 84.0, None), joint, 97.0)  # 82 s a block x 4
    assert first_fit_too_long(scored(80.0, 84.0), joint, 400.0) is None
    assert first_fit_too_long(scored(80.0), joint, None) is None  # no time limit
    assert first_fit_too_long(scored(None, None), joint, 1.0) is None  # an older cache: no timing, the fit runs


def test_scoring_records_the_seconds_each_block_took(tmp_path):
    from graphprune.cache import JsonCache

    teacher = gp.load("zoo:cifar10_resnet20")
    blocks = gp.find_blocks(teacher)[:2]
    tiny = load_tiny_set(data_path("cifar10", "train_lossless_4000.npz"), Preprocessing((3, 32, 32)), 32, seed=0)
    train, holdout = split_holdout(tiny, 0.5, seed=0)
    cache = JsonCache(tmp_path, "recoverability", "test")
    settings = RecoverabilitySettings(iterations=2, batch_size=8)
    fresh = score_blocks(teacher, blocks, train, holdout, settings, show_progress=False, cache=cache)
    assert all(s.seconds > 0 for s in fresh)
    again = score_blocks(teacher, blocks, train, holdout, settings, show_progress=False, cache=cache)
    assert [s.seconds for s in again] == [s.seconds for s in fresh]  # the cache keeps them
