"""Recoverability: adaptor placement (structural) and what the estimators compute (numerical)."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from conftest import data_path
from graphprune.cache import JsonCache
from graphprune.data import Preprocessing, load_tiny_set, split_holdout
from graphprune.passes import recoverability as rec
from graphprune.passes.recoverability import RecoverabilitySettings, adaptor_sites, score_blocks, shape_region
from long_shortcut import long_shortcut_onnx


@pytest.fixture(scope="module")
def pretrained_r20():
    return gp.load("zoo:cifar10_resnet20", weights=str(data_path("cifar10-resnet-akamaster", "resnet20-12fca82f.th")))


@pytest.fixture(scope="module")
def tiny_split():
    tiny = load_tiny_set(data_path("cifar10", "train_lossless_4000.npz"), Preprocessing((3, 32, 32)), 96, seed=1)
    return split_holdout(tiny)


def test_adaptor_sites_follow_practise():
    model = gp.load("zoo:cifar10_resnet20")
    blocks = gp.find_blocks(model)
    by_name = {b.name: b for b in blocks}
    region = shape_region(blocks, by_name["layer2.1"])
    assert [b.name for b in region] == ["layer2.0", "layer2.1", "layer2.2"]
    sites = adaptor_sites(model.graph_module, blocks, region, by_name["layer2.1"])
    producers = [p for p, _ in sites]
    # before the gap: layer2.0's branch output; after it: layer2.2's and layer3.0's branch inputs
    assert producers == [by_name["layer2.0"].branch_output, by_name["layer2.2"].entry, by_name["layer3.0"].entry]
    assert sites[0][1] == [by_name["layer2.0"].merge]
    assert all(len(readers) == 1 for _, readers in sites[1:])  # each block's first conv


def test_estimators_on_real_weights(pretrained_r20, tiny_split):
    train, holdout = tiny_split
    blocks = gp.find_blocks(pretrained_r20)
    some = ["layer1.1", "layer2.0", "layer3.2"]

    def score(**settings):
        return score_blocks(pretrained_r20, blocks, train, holdout, RecoverabilitySettings(**settings),
                            show_progress=False, candidates=some)

    none, lstsq = score(estimator="none"), score(estimator="lstsq")
    assert [s.recoverability for s in score(estimator="lstsq", iterations=0)] == [s.recoverability for s in lstsq]  # closed form: no steps
    practise = score(estimator="practise", iterations=15, batch_size=32)
    for a, b, c in zip(none, lstsq, practise):
        assert a.recoverability == a.before_fit > 0
        assert b.before_fit == pytest.approx(a.before_fit)
        assert b.recoverability < a.recoverability  # a fitted linear map beats no map
        assert c.recoverability < a.recoverability  # so do a few SGD steps on the adaptors
        assert 0 < c.relative < 1
    assert all(0 < s.recoverability < 1 for s in score(estimator="influence"))


def test_scores_are_cached_and_resumed(pretrained_r20, tiny_split, tmp_path, monkeypatch):
    train, holdout = tiny_split
    blocks = gp.find_blocks(pretrained_r20)[:2]
    cache = JsonCache(tmp_path, "recoverability", "k")
    first = score_blocks(pretrained_r20, blocks, train, holdout, RecoverabilitySettings("none"), cache=cache,
                         show_progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("a cached block was scored again")

    monkeypatch.setattr(rec, "_Context", boom)
    again = score_blocks(pretrained_r20, blocks, train, holdout, RecoverabilitySettings("none"),
                         cache=JsonCache(tmp_path, "recoverability", "k"), show_progress=False)
    assert again == first


def test_unknown_estimator(pretrained_r20, tiny_split):
    with pytest.raises(gp.GraphpruneError, match="unknown recoverability estimator"):
        score_blocks(pretrained_r20, gp.find_blocks(pretrained_r20), *tiny_split, RecoverabilitySettings("magic"))


def test_bfloat16_fits_score_like_float32_fits(pretrained_r20, tiny_split):
    """precision="bfloat16": the adaptors train under bf16 autocast, the held-out error (the score)
    is computed in float32; the fits still help, and the scores stay close to float32 ones."""
    train, holdout = tiny_split
    blocks = gp.find_blocks(pretrained_r20)
    some = ["layer1.1", "layer2.0", "layer3.2"]

    def score(precision):
        return score_blocks(pretrained_r20, blocks, train, holdout,
                            RecoverabilitySettings(iterations=15, batch_size=32, precision=precision),
                            show_progress=False, candidates=some)

    for full, half in zip(score("float32"), score("bfloat16")):
        assert half.before_fit == pytest.approx(full.before_fit)  # no fit: float32 either way
        assert half.recoverability < half.before_fit
        assert half.recoverability == pytest.approx(full.recoverability, rel=0.2)
    with pytest.raises(gp.GraphpruneError, match="precision"):
        score_blocks(pretrained_r20, blocks, *tiny_split, RecoverabilitySettings(precision="fp8"))


def test_a_long_shortcut_is_cached_with_the_prefix_and_scores_alike(tmp_path, monkeypatch):
    from graphprune import features
    from graphprune.data import TinySet
    from graphprune.features import cut_before, suffix_from

    model = gp.load(long_shortcut_onnx(tmp_path))
    blocks = gp.find_blocks(model)
    assert len(blocks) == 2
    gm = model.graph_module
    cut = cut_before(gm, blocks[1].entry)
    assert cut[0] == blocks[1].entry and len(cut) == 2  # the second block's input and h, which the Concat reads
    suffix = suffix_from(gm, cut, gm.graph.output_node().args[0].name)
    assert len([n for n in suffix.graph.nodes if n.op == "placeholder"]) == 2
    assert not any(n.op == "call_module" and n.target in ("stem",) for n in suffix.graph.nodes)
    images = torch.rand(48, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    train, holdout = TinySet(images[:32], -torch.ones(32, dtype=torch.long)), \
        TinySet(images[32:], -torch.ones(16, dtype=torch.long))
    settings = RecoverabilitySettings(iterations=6, batch_size=16)
    calls = []
    real = features.suffix_from  # what features.cached_suffix calls, for scoring as for recovery
    monkeypatch.setattr(features, "suffix_from",
                        lambda gm, start, *a: calls.append((start, real(gm, start, *a))) or calls[-1][1])
    cached = score_blocks(model, blocks, train, holdout, settings, show_progress=False)
    assert any(not isinstance(start, str) and suffix is not None for start, suffix in calls)  # from the cached cut
    monkeypatch.setattr(features, "cut_before", lambda gm, start: None)  # the whole network from the images
    from_images = score_blocks(model, blocks, train, holdout, settings, show_progress=False)
    for a, b in zip(cached, from_images):
        assert a.recoverability == pytest.approx(b.recoverability, rel=1e-4) and a.recoverability < a.before_fit


class _MiniMobileVit(torch.nn.Module):
    """MobileViT's shape: blocks on 2x2 patches with the batch folded in, (N * 4, 16, C), folded
    back and concatenated with the feature map they came from."""

    def __init__(self):
        super().__init__()
        self.stem, self.fuse, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(16, 8, 1), torch.nn.Linear(8, 5)
        self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
                                        for _ in range(2))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        b = h.shape[0]
        p = h.reshape(b, 8, 4, 2, 4, 2).permute(0, 3, 5, 2, 4, 1).reshape(b * 4, 16, 8)
        for mlp in self.mlps:
            p = p + mlp(p)
        y = p.reshape(b, 2, 2, 4, 4, 8).permute(0, 5, 3, 1, 4, 2).reshape(b, 8, 8, 8)
        return self.fc(torch.relu(self.fuse(torch.cat([h, y], 1))).mean((2, 3)))


def test_blocks_on_a_folded_batch_score_from_the_cached_prefix(tmp_path):
    """The cached prefix holds the patches (4 rows an image) and the feature map (1 row): the fit
    drew rows of the first for both (mobilevit_xxs: 'index 44 is out of bounds for dimension 0
    with size 12'); it draws images, and each value's rows of them."""
    from graphprune.data import TinySet

    torch.manual_seed(0)
    path = tmp_path / "mvit.onnx"
    torch.onnx.export(_MiniMobileVit().eval(), (torch.randn(1, 3, 8, 8),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    model = gp.load(path)
    blocks = gp.find_blocks(model)
    assert [b.input_shape for b in blocks] == [(4, 16, 8)] * 2
    images = torch.rand(48, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    train, holdout = TinySet(images[:32], -torch.ones(32, dtype=torch.long)), \
        TinySet(images[32:], -torch.ones(16, dtype=torch.long))
    scores = score_blocks(model, blocks, train, holdout, RecoverabilitySettings(iterations=6, batch_size=16),
                          show_progress=False)
    assert all(0 <= s.recoverability <= s.before_fit for s in scores)


def test_errors_without_adaptors_run_each_block_from_one_recorded_pass(pretrained_r20, tiny_split, monkeypatch):
    """Scoring at 0 steps (a time budget's floor) records every block's input in one pass of the
    original, then runs only the network after each block; the errors are those of the whole
    network without that block, run from the images."""
    from graphprune.features import mimic_loss, mimic_targets, run_batched, target_names, target_weights, truncate
    from graphprune.passes.drop_blocks import drop_blocks

    train, holdout = tiny_split
    blocks = gp.find_blocks(pretrained_r20)
    from graphprune.passes.recording import Recording

    recorded = []
    real = Recording.record
    monkeypatch.setattr(Recording, "record", lambda self, split, cut=(): recorded.append(split) or real(self, split, cut))
    scores = score_blocks(pretrained_r20, blocks, train, holdout, RecoverabilitySettings(iterations=0),
                          show_progress=False)
    assert recorded == ["holdout"]  # one pass, for all 9 blocks
    gm = pretrained_r20.graph_module
    targets = mimic_targets(pretrained_r20, None)
    teacher = [run_batched(truncate(gm, target_names(gm, targets)), x) for x in (train.images, holdout.images)]
    for block, score in zip(blocks, scores):
        student = drop_blocks(pretrained_r20, [block.name], blocks).graph_module
        whole = run_batched(truncate(student, target_names(student, targets)), holdout.images)
        expected = float(mimic_loss(whole, teacher[1], target_weights(teacher[0])))
        assert score.before_fit == score.recoverability == pytest.approx(expected, rel=1e-5) and expected > 0


def test_recording_stays_within_its_memory_share_and_frees_what_was_scored(pretrained_r20, tiny_split, monkeypatch):
    """With no room (RECORD_MEMORY_SHARE 0) each block records only its own input, one pass each;
    the scores are the same, and every planned value is freed once its block is scored."""
    from graphprune.passes import recording
    from graphprune.passes.recording import Recording

    train, holdout = tiny_split
    blocks = gp.find_blocks(pretrained_r20)
    contexts, passes = [], []
    real = Recording.record

    def record(self, split, cut=()):
        contexts.append(self)
        before = len(self.recorded[split])
        real(self, split, cut)
        passes.append(len(self.recorded[split]) - before)
    monkeypatch.setattr(Recording, "record", record)
    for settings in (RecoverabilitySettings(iterations=0), RecoverabilitySettings(iterations=4, batch_size=16)):
        roomy = score_blocks(pretrained_r20, blocks, train, holdout, settings, show_progress=False)
        assert not contexts[-1].recorded["holdout"] and not contexts[-1].recorded["train"]  # all freed
        assert not contexts[-1].named_by and not contexts[-1].planned["holdout"]
        roomy_passes, passes[:] = len(passes), []
        monkeypatch.setattr(recording, "RECORD_MEMORY_SHARE", 0.0)
        tight = score_blocks(pretrained_r20, blocks, train, holdout, settings, show_progress=False)
        monkeypatch.setattr(recording, "RECORD_MEMORY_SHARE", 0.25)
        assert len(passes) > roomy_passes and max(passes) <= 2  # a cut at a time: the input (and a shortcut)
        assert [s.to_dict() | {"seconds": None} for s in tight] == [s.to_dict() | {"seconds": None} for s in roomy]
        passes[:] = []
