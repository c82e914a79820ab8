"""Recovery: what trains and what stays frozen (structural), and that it mimics (numerical)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from conftest import data_path
from graphprune.data import Preprocessing, TinySet, load_tiny_set
from graphprune.features import classifier_node, feature_map_node_name, feature_node_name, run_batched, truncate
from graphprune.passes.recover import RecoverySettings, recover
from long_shortcut import long_shortcut_onnx


@pytest.fixture(scope="module")
def setup():
    # Real weights: a random network's BatchNorm statistics do not describe its activations, so
    # train-mode BatchNorm would move them away from the teacher's and hide what is tested.
    teacher = gp.load("zoo:cifar10_resnet20", weights=str(data_path("cifar10-resnet-akamaster", "resnet20-12fca82f.th")))
    pruned = gp.drop_blocks(teacher, ["layer1.1", "layer2.2"])
    tiny = load_tiny_set(data_path("cifar10", "train_lossless_4000.npz"), Preprocessing((3, 32, 32)), 48, seed=0)
    return teacher, pruned, tiny


def _feature_mse(model, teacher, images):
    feature = feature_node_name(teacher)
    return float(F.mse_loss(_output(model, feature, images), _output(teacher, feature, images)))


def test_feature_node_is_the_classifier_input(setup):
    teacher, _, _ = setup
    assert classifier_node(teacher).target == "linear"
    assert feature_node_name(teacher) == "flatten"


def test_mimicking_lowers_feature_error_and_freezes_the_classifier(setup):
    teacher, pruned, tiny = setup
    before = _feature_mse(pruned, teacher, tiny.images)
    snapshot = {k: v.clone() for k, v in pruned.graph_module.state_dict().items()}
    recovered, record = recover(pruned, teacher, tiny, RecoverySettings(iterations=40, batch_size=16, lr=0.02,
                                                                        augment="none"), show_progress=False)
    assert _feature_mse(recovered, teacher, tiny.images) < 0.7 * before
    state = recovered.graph_module.state_dict()
    assert torch.equal(state["linear.weight"], snapshot["linear.weight"])
    assert torch.equal(state["linear.bias"], snapshot["linear.bias"])
    assert not torch.equal(state["layer1.0.conv1.weight"], snapshot["layer1.0.conv1.weight"])
    assert not torch.equal(state["layer1.0.bn1.running_mean"], snapshot["layer1.0.bn1.running_mean"])  # BN trained
    assert all(torch.equal(v, snapshot[k]) for k, v in pruned.graph_module.state_dict().items())  # input untouched
    assert str(recovered.graph_module.graph) == str(pruned.graph_module.graph)
    assert record["loss_curve"][-1]["loss"] < record["loss_curve"][0]["loss"]
    assert record["kept_start_as_training_raised_its_error"] is None


def test_training_that_raises_the_error_on_its_own_images_keeps_the_start(setup):
    """Without held-out images the start is still a checkpoint, judged on the training images
    themselves: Adam at lr 1 wrecks ResNet-20 in 5 steps, and the pruned model comes back as it was,
    weights and BatchNorm statistics alike."""
    teacher, pruned, tiny = setup
    recovered, record = recover(pruned, teacher, tiny, RecoverySettings(iterations=5, batch_size=16, lr=1.0,
                                                                        augment="none"), show_progress=False)
    raised = record["kept_start_as_training_raised_its_error"]
    assert raised["train_error_end"] > raised["train_error_start"] == pytest.approx(
        _feature_mse(pruned, teacher, tiny.images), rel=1e-4)
    before, after = pruned.graph_module.state_dict(), recovered.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_label_loss_keeps_classifier_frozen(setup):
    teacher, pruned, tiny = setup
    recovered, _ = recover(pruned, teacher, tiny, RecoverySettings(iterations=5, batch_size=16, loss="label"),
                           show_progress=False)
    assert torch.equal(recovered.graph_module.state_dict()["linear.weight"],
                       pruned.graph_module.state_dict()["linear.weight"])


def _output(model, node, images):
    return run_batched(truncate(model.graph_module, node), images)


def test_the_feature_map_is_the_tensor_the_features_are_pooled_from(setup):
    teacher, _, tiny = setup
    feature = feature_node_name(teacher)
    name = feature_map_node_name(teacher, feature)
    assert _output(teacher, name, tiny.images[:2]).shape == (2, 64, 8, 8)
    assert torch.allclose(_output(teacher, name, tiny.images[:2]).mean((2, 3)), _output(teacher, feature, tiny.images[:2]))
    without_last = gp.drop_blocks(teacher, ["layer3.2"])  # the map was that block's output
    other = feature_map_node_name(without_last, feature)
    assert other != name and _output(without_last, other, tiny.images[:2]).shape == (2, 64, 8, 8)
    mlp = gp.load(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                  input_shape=(1, 3, 2, 2))
    assert feature_map_node_name(mlp, feature_node_name(mlp)) is None  # features come through weights
    few = TinySet(torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(gp.GraphpruneError, match="feature-map"):
        recover(mlp, mlp, few, RecoverySettings(iterations=1, target="feature-map"), show_progress=False)
    # "auto" takes the map where both networks have one, else the features, and never refuses
    _, record = recover(mlp, mlp, few, RecoverySettings(iterations=1, target="auto"), show_progress=False)
    mlp_feature = feature_node_name(mlp)
    assert record["mimicked_nodes"] == {"original": [mlp_feature], "pruned": [mlp_feature]}
    _, record = recover(without_last, teacher, tiny, RecoverySettings(iterations=1, target="auto"), show_progress=False)
    assert record["mimicked_nodes"] == {"original": [name], "pruned": [other]}


def test_mimicking_the_feature_map_lowers_the_map_and_the_feature_error(setup):
    teacher, pruned, tiny = setup
    feature = feature_node_name(teacher)
    name = feature_map_node_name(teacher, feature)

    def map_mse(model):
        return float(F.mse_loss(_output(model, name, tiny.images), _output(teacher, name, tiny.images)))
    before_map, before_features = map_mse(pruned), _feature_mse(pruned, teacher, tiny.images)
    recovered, record = recover(pruned, teacher, tiny, RecoverySettings(iterations=40, batch_size=16, lr=0.02,
                                                                        augment="none", target="feature-map"),
                                show_progress=False)
    assert record["mimicked_nodes"] == {"original": [name], "pruned": [name]}
    assert map_mse(recovered) < 0.7 * before_map
    assert _feature_mse(recovered, teacher, tiny.images) < before_features


@pytest.mark.parametrize("bad,message", [
    (dict(loss="label"), "labelled"), (dict(target="pixels"), "recovery target"), (dict(schedule="wavy"), "schedule"), (dict(augment="zoom"), "augmentation"),
    (dict(trainable="weights"), "recovery.trainable"),
])
def test_bad_recovery_settings(setup, bad, message):
    teacher, pruned, tiny = setup
    data = TinySet(tiny.images, torch.full((48,), -1)) if bad.get("loss") == "label" else tiny
    with pytest.raises(gp.GraphpruneError, match=message):
        recover(pruned, teacher, data, RecoverySettings(iterations=2, **bad), show_progress=False)


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        conv = lambda: torch.nn.Conv2d(8, 8, 3, padding=1)  # noqa: E731
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.first = torch.nn.Sequential(conv(), torch.nn.ReLU(), conv())
        self.second = torch.nn.Sequential(conv(), torch.nn.ReLU(), conv())
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(y + self.first(y))
        y = torch.relu(y + self.second(y))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("freeze", ["on", "off"])
def test_a_frozen_prefix_is_not_trained_and_the_rest_is(freeze):
    torch.manual_seed(0)
    teacher = gp.load(TwoBlocks().eval(), input_shape=(1, 3, 12, 12))
    blocks = gp.find_blocks(teacher)
    pruned = gp.drop_blocks(teacher, ["first"], blocks)
    tiny = TinySet(torch.randn(32, 3, 12, 12), torch.zeros(32, dtype=torch.long))
    settings = RecoverySettings(iterations=20, batch_size=8, lr=3e-3, augment="none", freeze_prefix=freeze)
    recovered, record = recover(pruned, teacher, tiny, settings, show_progress=False,
                                frozen_until=blocks[0].entry)
    before, after = dict(pruned.graph_module.named_parameters()), dict(recovered.graph_module.named_parameters())
    prefix = [k for k in before if k.startswith("stem")]
    assert prefix and all(k in after for k in prefix)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if freeze == "on":
        assert record["frozen_prefix"] == blocks[0].entry and not changed & set(prefix)
    else:
        assert record["frozen_prefix"] is None and changed & set(prefix)
    assert {k.split(".")[0] for k in changed - set(prefix)} == {"second"}  # the classifier is never trained
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_bias_only_recovery_trains_the_biases_alone_and_mimics(setup):
    teacher, pruned, tiny = setup
    settings = RecoverySettings(iterations=30, batch_size=16, lr=3e-3, augment="none", trainable="bias")
    recovered, record = recover(pruned, teacher, tiny, settings, show_progress=False)
    before, after = pruned.graph_module.state_dict(), recovered.graph_module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in changed if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert trained and all(k.endswith(".bias") for k in trained) and "linear.bias" not in trained
    assert record["trained_tensors"] == len([k for k in before if k.endswith(".bias")]) - 1  # all but the classifier's
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_a_time_budget_sizes_the_schedule(setup):
    teacher, pruned, tiny = setup
    settings = RecoverySettings(iterations=10_000, batch_size=8, augment="none", max_seconds=0.5)
    _, record = recover(pruned, teacher, tiny.subset(range(16)), settings, show_progress=False)
    assert 3 < record["iterations_run"] < 10_000 and record["loss_curve"][-1]["step"] == record["iterations_run"]


def test_steps_that_slow_down_shorten_the_schedule_again(setup, monkeypatch):
    """The first steps are fast, the rest slow (another process took the cores): the schedule sized
    on the first steps is sized again on the pace so far, and the run ends near its budget."""
    import graphprune.passes.recover as recover_module

    teacher, pruned, tiny = setup
    real, calls = recover_module.mimic_loss, []

    def slow_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(recover_module, "mimic_loss", slow_after_three)
    # sized on the first (fast) steps the schedule keeps about 2 s / 10 ms = 200 steps: 10 s of slow ones
    settings = RecoverySettings(iterations=400, batch_size=4, augment="none", max_seconds=2.0)
    start = time.perf_counter()
    _, record = recover(pruned, teacher, tiny.subset(range(16)), settings, show_progress=False)
    assert record["iterations_run"] < 100 and time.perf_counter() - start < 6.0


class BatchFromInput(TwoBlocks):
    """TwoBlocks whose head reshapes with the batch read off the *input* (``x.view(x.size(0), -1)``,
    which the ONNX exporter writes as Shape -> Gather -> Reshape): the suffix after the prefix
    reads the images' shape, not their values."""

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(y + self.first(y))
        y = torch.relu(y + self.second(y))
        return self.fc(y.mean((2, 3)).reshape(x.shape[0], -1))


class ValueFromInput(TwoBlocks):
    def forward(self, x):
        return super().forward(x) + x.mean()


def _onnx_model(module, tmp_path):
    from conftest import export_onnx

    torch.manual_seed(0)
    return gp.load(export_onnx(module.eval(), (1, 3, 12, 12), tmp_path / "m.onnx"))


def test_a_suffix_reads_only_the_shape_of_the_input(tmp_path):
    """suffix_from: the rest of the graph from a block's entry, where the classifier's reshape reads
    the batch off the input: it equals the whole graph on a batch of another size (structural +
    numerical); where the values of the input are read again, there is no suffix."""
    from graphprune.features import suffix_from

    model = _onnx_model(BatchFromInput(), tmp_path)
    start = gp.find_blocks(model)[1].entry
    gm = model.graph_module
    last = [n for n in gm.graph.nodes if n.op == "output"][0].args[0].name
    assert suffix_from(gm, start, last) is None  # without the input's shape it cannot stand in
    suffix = suffix_from(gm, start, last, [x.shape for x in model.example_inputs()])
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(suffix(truncate(gm, start)(x)), gm(x), atol=1e-5)
    valued = _onnx_model(ValueFromInput(), tmp_path)
    vgm = valued.graph_module
    vlast = [n for n in vgm.graph.nodes if n.op == "output"][0].args[0].name
    assert suffix_from(vgm, gp.find_blocks(valued)[1].entry, vlast, [x.shape for x in valued.example_inputs()]) is None


@pytest.mark.parametrize("dropped", [0, 1])
def test_the_prefix_freezes_when_the_head_reads_the_batch_off_the_input(tmp_path, dropped):
    """With the first block dropped the prefix freezes although the head reads the input's shape;
    with the last one dropped nothing trainable would follow the gap, so the prefix trains instead."""
    teacher = _onnx_model(BatchFromInput(), tmp_path)
    blocks = gp.find_blocks(teacher)
    pruned = gp.drop_blocks(teacher, [blocks[dropped].name], blocks)
    tiny = TinySet(torch.randn(32, 3, 12, 12), torch.zeros(32, dtype=torch.long))
    settings = RecoverySettings(iterations=20, batch_size=8, lr=3e-3, augment="none", freeze_prefix="on")
    recovered, record = recover(pruned, teacher, tiny, settings, show_progress=False,
                                frozen_until=blocks[dropped].entry)
    assert record["frozen_prefix"] == (blocks[0].entry if dropped == 0 else None)
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_a_long_shortcut_keeps_the_prefix_frozen_and_feeds_the_rest_the_cut(tmp_path):
    """The head reads a value from before the dropped block (a neck's shortcut): the prefix is still
    frozen and run once, its output the cut's values (the block's input and that value), and what
    follows the gap trains; before, the whole network trained from the images."""
    teacher = gp.load(long_shortcut_onnx(tmp_path))
    blocks = gp.find_blocks(teacher)
    pruned = gp.drop_blocks(teacher, [blocks[1].name], blocks)
    images = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    tiny = TinySet(images, -torch.ones(32, dtype=torch.long))
    settings = RecoverySettings(iterations=20, batch_size=8, lr=3e-3, augment="none", freeze_prefix="on")
    recovered, record = recover(pruned, teacher, tiny, settings, show_progress=False, frozen_until=blocks[1].entry)
    assert record["frozen_prefix"] == blocks[1].entry
    before, after = dict(pruned.graph_module.named_parameters()), dict(recovered.graph_module.named_parameters())
    head = truncate(pruned.graph_module, blocks[1].entry)  # the modules its graph calls: the prefix's
    prefix = {f"{n.target}.{k}" for n in head.graph.nodes if n.op == "call_module"
              for k, _ in head.get_submodule(n.target).named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert prefix and changed and not changed & prefix
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_bfloat16_recovery_trains_float32_weights(setup):
    """precision="bfloat16": the forward passes under bf16 autocast (channels-last on the CPU), the
    weights and the written model stay float32 and contiguous, and mimicking still lowers the error."""
    teacher, pruned, tiny = setup
    settings = RecoverySettings(iterations=30, batch_size=16, augment="none", precision="bfloat16")
    recovered, _ = recover(pruned, teacher, tiny, settings, show_progress=False)
    params = list(recovered.graph_module.parameters())
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_bfloat16_recovery_of_a_model_holding_a_5d_constant(tmp_path):
    """A YOLOv5 head's anchor grid is a (1, 3, 1, 1, 2) buffer: putting the model in channels-last
    for bf16 converted it too and raised ("required rank 4 tensor"); only 4-d tensors are converted
    now, and the rest train as before."""
    from onnx_builders import save
    from yolo_like import tiny_yolo5_onnx

    teacher = gp.load(save(tiny_yolo5_onnx(), tmp_path / "yolo5.onnx"))
    assert any(b.dim() == 5 for b in teacher.graph_module.buffers())
    pruned = gp.drop_blocks(teacher, ["stage1.1.m.1"], gp.find_blocks(teacher))
    tiny = TinySet(torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0)), -torch.ones(16, dtype=torch.long))
    settings = RecoverySettings(iterations=10, batch_size=8, augment="none", precision="bfloat16")
    recovered, _ = recover(pruned, teacher, tiny, settings, show_progress=False)
    assert all(t.is_contiguous() for t in [*recovered.graph_module.parameters(), *recovered.graph_module.buffers()])
    assert _feature_mse(recovered, teacher, tiny.images) < _feature_mse(pruned, teacher, tiny.images)


def test_early_stop_keeps_the_checkpoint_with_the_lowest_held_out_error(setup, monkeypatch):
    """With held-out images, the weights of the checkpoint (the start included) with the lowest
    held-out feature error are kept. A fake error that rises after the start: the start is kept,
    so the recovered model is the pruned one (weights and BatchNorm statistics), and training stops
    after five checkpoints without a new best; with the real error, training helps here and runs to
    the end."""
    from graphprune import checkpoints

    teacher, pruned, tiny = setup
    train, holdout = tiny.subset(range(32)), tiny.subset(range(32, 48))
    settings = RecoverySettings(iterations=20, batch_size=8, augment="none", early_stop="on")
    _, record = recover(pruned, teacher, train, settings, show_progress=False, holdout=holdout)
    steps = [c["step"] for c in record["early_stop"]["checkpoints"]]
    assert steps == [0, *range(2, 21, 2)] and record["early_stop"]["holdout_images"] == 16
    assert record["early_stop"]["best_step"] > 0  # mimicking lowers the held-out error of real weights
    assert record["early_stop"]["stopped_at"] is None and record["iterations_run"] == 20

    errors = iter(range(100))  # 0 at the start, then only higher
    real_init = checkpoints.BestCheckpoint.__init__

    def rising(self, params, holdout_error):
        real_init(self, params, lambda: float(next(errors)))
    monkeypatch.setattr(checkpoints.BestCheckpoint, "__init__", rising)
    recovered, record = recover(pruned, teacher, train, settings, show_progress=False, holdout=holdout)
    assert record["early_stop"]["best_step"] == 0
    # five checkpoints in a row without a new best (EARLY_STOP_PATIENCE): training stops at step 10 of 20
    assert record["early_stop"]["stopped_at"] == 10 and record["iterations_run"] == 10
    before, after = pruned.graph_module.state_dict(), recovered.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's statistics too


def test_the_guard_compares_a_classifiers_class_distributions_and_a_detectors_features(setup, tmp_path):
    """Early stopping judges a classifier by KL(original || pruned) of its outputs on the held-out
    images (the start's value is the untrained pruned network's), and a model whose output is not
    class scores (a YOLOv8-style detector) by the mimicked feature error."""
    from graphprune.fidelity import class_kl
    from onnx_builders import save
    from yolo_like import tiny_yolo_onnx

    teacher, pruned, tiny = setup
    train, holdout = tiny.subset(range(32)), tiny.subset(range(32, 48))
    settings = RecoverySettings(iterations=4, batch_size=8, augment="none", early_stop="on")
    _, record = recover(pruned, teacher, train, settings, show_progress=False, holdout=holdout)
    start = record["early_stop"]["checkpoints"][0]["holdout_error"]
    assert record["early_stop"]["signal"] == "output KL"
    with torch.no_grad():
        expected = class_kl(pruned.graph_module.eval()(holdout.images), teacher.graph_module.eval()(holdout.images))
    assert start == pytest.approx(expected, rel=1e-4) and start > 0

    detector = gp.load(save(tiny_yolo_onnx(size=64), tmp_path / "yolo.onnx"))
    cut = gp.drop_blocks(detector, [gp.find_blocks(detector)[0].name])
    images = TinySet(torch.rand(24, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.full((24,), -1))
    _, record = recover(cut, detector, images.subset(range(16)), settings, show_progress=False,
                        holdout=images.subset(range(16, 24)))
    assert record["early_stop"]["signal"] == "feature error"


def test_the_summary_says_when_recovery_kept_the_untrained_weights():
    """Early stopping that keeps the start (no checkpoint lowered the held-out error) is one line of
    the summary: what a user without --eval-data needs to know about recovery."""
    from graphprune.report import format_summary

    report = {"latency": {"original_ms": 2.0, "optimized_ms": 1.5, "cut": 0.25, "target": 0.2}, "blocks": [],
              "dropped": [], "seconds_per_stage": {}, "recovery": {"kept_step": 0, "stopped_at": 10}}
    line = "recovery kept the untrained weights: no checkpoint lowered the held-out feature error, stopped at step 10"
    assert line in format_summary(report).splitlines()
    report["recovery"]["guard_signal"] = "output KL"
    assert line.replace("feature error", "output KL") in format_summary(report).splitlines()
    report["recovery"] = {"kept_step": 20, "stopped_at": None}
    assert "recovery kept" not in format_summary(report)
    report["recovery"] = {"kept_step": 0, "stopped_at": None, "diverged": True}
    assert ("recovery kept the untrained weights: training raised the feature error on the tiny set itself (a lower "
            "--recovery-lr may train)") in format_summary(report).splitlines()
