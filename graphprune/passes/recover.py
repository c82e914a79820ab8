"""Transform: recover a pruned network on the tiny set by feature mimicking.

    min over student weights   E_x || f_student(aug(x)) - f_teacher(aug(x)) ||^2

where ``f`` are the targets (:mod:`graphprune.features`: the inputs of the last trained layers
behind every output, the features before a classifier's last linear; several targets weighted so
that none dominates by its scale), or, with ``target="feature-map"``, the maps those targets are
pooled from (:func:`~graphprune.features.feature_map_node_name`; with ``target="auto"`` each
target's map where both networks have one, else the target itself), the
teacher is the original network (frozen, eval mode) and ``aug`` is random crop (with padding for
small images, random-resized crop for large ones) plus horizontal flip, drawn afresh every step
and shown to both networks. Every weight trains except the last trained layers, which are not
even part of the student's graph here, so they are frozen by construction; BatchNorm runs in train mode where
the graph has it. SGD with momentum and weight decay (or AdamW), cosine or step learning-rate
decay.

Two costs of large images (224 px) are cut: with ``freeze_prefix`` ("auto": above 64 px) the
network before the first dropped block, which is the original's, is not trained, and one run of it
per batch feeds both the teacher's and the student's rest (the early high-resolution layers are
most of a step's work; where the rest also reads earlier values, a neck's shortcut, the prefix
gives it those too: PP-OCRv4's recogniser, 3 of its 4 blocks dropped, batch 64, trained 3 steps
in 8.7 s against 33.5 s from the image); ``max_seconds`` sizes the schedule to the steps that fit, timed on the
first steps and again every tenth of the schedule (shorter only: a machine that gets busier).
With held-out images (``early_stop``), the weights of the best of ten checkpoints are kept, and
training stops once half of them in a row have not improved on the best (nothing to gain). "Best"
is judged on what the model outputs where it classifies (the class distributions' KL to the
original's), not on the mimicked features, which can come closer while the classes drift away
(:func:`~.recovery_parts.holdout_signal`); elsewhere on the feature error. Without,
the start is kept where training ends with a higher feature error on the training images themselves
(un-augmented) than it began with: it diverged.

``loss="label"`` is the paper's BP baseline instead: cross-entropy with the labels through the
classifier, whose parameters are then explicitly frozen (``requires_grad=False``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..augment import augmenter
from ..checkpoints import BestCheckpoint, checkpoint_steps
from ..data import TinySet
from ..errors import GraphpruneError
from ..features import (classifier_parameters, mimic_loss, mimic_targets, run_batched, target_names, target_weights,
                        truncate)
from ..memory import training_batch
from ..model import Model
from ..precision import autocast, check_device, check_precision, memory_format, to_format
from ..progress import progress_bar
from .base import PassResult, Transform
from .find_blocks import Blocks
from .recovery_parts import (feature_map, holdout_error, holdout_signal, mimicked_nodes, split_at,
                             trainable_parameters)
from .selection import Selection


# the largest learning rate taken (recovery's and the adaptors'): 1e300 overflowed float32 inside
# torch's optimizer; 10 is far past any that trains
MAX_LR = 10


@dataclass(frozen=True)
class RecoverySettings:
    # Defaults from benchmarks/studies/scoring_study.py's sweep (ResNet-56 ONNX, 40% cut, 500 images): on
    # graphs whose BatchNorm was folded into the convs, SGD at the paper's lr 0.02 diverges and at
    # 0.003 reaches 89.2%; AdamW at 3e-4 reaches 90.5% in 2000 steps (4000 steps add nothing).
    iterations: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # AdamW; or "sgd" (with momentum, as the official code)
    clip_grad_norm: float | None = None
    schedule: str = "cosine"  # or "step" (x0.1 at 40%, as the official code)
    # "crop-flip", "resized-crop-flip", "resized-crop-flip-mixup", "none" or "auto" (by image size)
    augment: str = "auto"
    loss: str = "mimic"  # or "label" (cross-entropy, classifier frozen)
    target: str = "features"  # what "mimic" matches: "features", "feature-map" (before pooling) or "auto"
    # "auto": for images above 64 px the network before the first dropped block is frozen and run
    # once for teacher and student (it is the original's); "on", "off"
    freeze_prefix: str = "auto"
    max_seconds: float | None = None  # the schedule sized to the steps that fit, measured on the first steps
    # "auto": bf16 autocast where the hardware computes bf16 natively (precision.py), else float32. On
    # the AMD EPYC (AVX512-BF16) a ResNet-56 step took 0.22 s instead of 0.38 and the recovered top-1
    # was the same (3 blocks of the 0.6 int8 row, seed 2021: 92.9 / 83.69 against 92.9 / 83.64 in
    # float32, lossless1000 / jpeg10k); EfficientNet-Lite0 steps 2.1-2.8x faster.
    precision: str = "auto"
    # "auto": for images above 64 px, train on the tiny set's training part and keep the weights of
    # the checkpoint (the start included) with the lowest feature error on its held-out part
    # (checkpoints.py): on EfficientNet-Lite0 with 200 photos, 1259 steps of mimicking took top-1
    # from 78.9 (blocks dropped, no recovery) down to 74.1 while the training loss fell 5x. Training
    # stops after EARLY_STOP_PATIENCE checkpoints in a row without a new best. "on", "off"
    early_stop: str = "auto"
    seed: int = 0
    device: str = "cpu"
    # "all", or "bias": only the biases train (a per-channel shift, few parameters). On EfficientNet-Lite0
    # with 160 photos (benchmarks/studies/lite0_recovery.py) bias-only recovery at lr 1e-3 was as
    # neutral as training everything at lr 1e-4 on the feature map (81.12 against 81.25 untrained)
    trainable: str = "all"


@dataclass(frozen=True)
class RecoveryLog:
    """Artefact: how recovery went (the loss curve of ``{step, loss}`` points, the last loss, seconds),
    whether it trained on ``ctx.holdout`` too (it does unless it stops early on it) and, where it
    did stop early on it, the step whose weights were kept, the step it stopped at and what it
    compared (``guard_signal``: "output KL" or "feature error")."""

    loss_curve: list
    final_loss: float | None
    seconds: float
    trained_on_holdout: bool = False
    kept_step: int | None = None
    stopped_at: int | None = None
    diverged: bool = False  # training raised the error on its own images: the start was kept
    guard_signal: str | None = None  # what early stopping compared on the held-out images


# Under optimize's time budget, seconds kept for what follows recovery (the final timing, an int8
# quantisation, writing): recovery takes the rest.
RESERVE_SECONDS = 60.0


class Recover(Transform):
    """Train the pruned model to mimic ``ctx.original``'s features on every image of ``ctx.tiny``;
    where the ``Selection`` is empty no block was dropped and nothing is trained."""

    name = "recover"
    config_field = "recovery"
    optional = (Selection, Blocks)
    provides = (RecoveryLog,)

    def __init__(self, settings: RecoverySettings = RecoverySettings()):
        self.settings = settings

    def check(self, model: Model, ctx) -> None:
        check_recovery(ctx.original, ctx.need("tiny", self.name), self.settings, ctx.feature_node)

    def run(self, model: Model, ctx, inputs) -> PassResult:
        selection = inputs.get(Selection)
        if selection is not None and not selection.blocks:
            record = {"skipped": "no block was dropped (quantisation alone reaches the target): nothing to recover",
                      "loss_curve": [], "final_loss": None, "seconds": 0.0}
            return PassResult(model, record=record, artifacts=[RecoveryLog([], None, 0.0)])
        blocks, dropped = inputs.get(Blocks) or [], set(selection.blocks if selection else [])
        first = next((b.entry for b in blocks if b.name in dropped), None)  # Blocks are in graph order
        budget = ctx.stage_budget(self.settings.max_seconds, reserve=RESERVE_SECONDS)
        settings = self.settings if budget is None else replace(self.settings, max_seconds=max(budget, 1e-3))
        tiny = ctx.need("tiny", self.name)
        stops = settings.loss == "mimic" and _large_images(settings.early_stop, tiny.images.shape[-2:])
        train, holdout = (ctx.need("train", self.name), ctx.need("holdout", self.name)) if stops else (tiny, None)
        recovered, record = recover(model, ctx.original, train, settings, ctx.feature_node, ctx.show_progress,
                                    frozen_until=first, holdout=holdout)
        guard = record["early_stop"] or {}
        diverged = record["kept_start_as_training_raised_its_error"] is not None
        log = RecoveryLog(record["loss_curve"], record["final_loss"], record["seconds"],
                          trained_on_holdout=holdout is None and settings.iterations > 0 and not diverged,
                          kept_step=0 if diverged else guard.get("best_step"), stopped_at=guard.get("stopped_at"),
                          diverged=diverged, guard_signal=guard.get("signal"))
        return PassResult(recovered, changed=settings.iterations > 0, record=record, artifacts=[log])


def recover(model: Model, teacher: Model, train: TinySet, settings: RecoverySettings,
            feature_node: str | None = None, show_progress: bool = True,
            frozen_until: str | None = None, holdout: TinySet | None = None) -> tuple[Model, dict]:
    """A trained copy of ``model`` and a record (loss curve, time). ``frozen_until``: the node
    before which the pruned model is the original (the first dropped block's entry), frozen there
    when ``settings.freeze_prefix`` says so. ``holdout``: images never trained on; the weights of
    the checkpoint with the lowest feature error on them are kept (mimicking only)."""
    _check(settings, train)  # the augmentation and the maps are checked where they are built below
    student_model = model.clone()
    device = torch.device(settings.device)
    batch_size = training_batch(student_model, settings.batch_size) if settings.iterations else settings.batch_size
    targets = mimic_targets(teacher, feature_node)
    mimicked = mimicked_nodes(teacher, student_model, targets, settings)
    teacher_full = teacher.clone().graph_module.to(device).eval()
    full = student_model.graph_module.to(device)
    images, labels = train.images, train.labels
    split = None
    if settings.loss == "mimic" and frozen_until and _large_images(settings.freeze_prefix, images.shape[-2:]):
        split = split_at(full, teacher_full, frozen_until, mimicked, [x.shape for x in teacher.example_inputs()])
    if split is not None and not trainable_parameters(split[2], set(), settings.trainable):
        split = None  # only the frozen classifier follows the gap (the last block dropped): train the prefix
    if settings.loss == "label":
        student, frozen = full, {id(p) for p in classifier_parameters(student_model)}
        prefix, teacher_gm = None, truncate(teacher_full, mimicked[0])
    elif split is not None:
        (prefix, teacher_gm, student), frozen = split, set()
    else:
        student, frozen = truncate(full, mimicked[1]), set()
        prefix, teacher_gm = None, truncate(teacher_full, mimicked[0])
    params = trainable_parameters(student, frozen, settings.trainable)
    for p in full.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise GraphpruneError("nothing to train: the pruned model has no trainable weights")
    if settings.optimizer == "adam":
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    total = settings.iterations
    schedule = _schedule(settings.schedule, total)
    gen = torch.Generator().manual_seed(settings.seed)
    # one target weighs 1; several are weighted by their scale on the tiny set (features.py)
    weights = [1.0] if len(mimicked[0]) == 1 else \
        target_weights(run_batched(truncate(teacher_full, mimicked[0]), images.to(device)))
    augment = augmenter(settings.augment, images.shape[-2:])
    fmt = memory_format(settings.precision, settings.device, prefix, teacher_gm, student)
    cast = functools.partial(autocast, settings.precision, settings.device)
    curve, window = [], []
    guard = at_start = None
    kept = [*params, *student.buffers()]  # what a checkpoint keeps: BatchNorm's statistics train too
    if holdout is not None and settings.loss == "mimic":
        signal, guard_error = holdout_signal(holdout.images.to(device), prefix, teacher_gm, student, weights,
                                             teacher_full, full)
        guard = BestCheckpoint(kept, guard_error)
        checkpoints = checkpoint_steps(total, EARLY_STOP_CHECKPOINTS)
    elif settings.loss == "mimic" and total > 0:
        # no held-out images: the start is still kept where training leaves the error on the training
        # images themselves (un-augmented) higher than it found it, i.e. it diverged. Adam's steps are
        # about lr whatever a weight's scale: a network whose features are ~1e-6 (torchvision's MNASNet
        # with its initial weights) came out of 10 steps at lr 3e-4 with outputs 23x its own off.
        at_start = BestCheckpoint(kept, holdout_error(images.to(device), prefix, teacher_gm, student, weights))
    start = time.perf_counter()
    bar = progress_bar(total=total, desc="recovery", enabled=show_progress)
    student.train()
    step = 0
    resize_every = TIMED_STEPS
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * schedule(step)
        index = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        batch = to_format(augment(images[index], gen).to(device), fmt)
        if settings.loss == "label":
            with cast():
                logits = student(batch)
            loss = F.cross_entropy(logits.float(), labels[index].to(device))
        else:
            with torch.no_grad(), cast():
                # both models compute the prefix alike: once, untrained (its output: the cut's values)
                inputs = prefix(batch) if prefix is not None else (batch,)
                target = [t.float() for t in teacher_gm(*inputs)]
            with cast():
                output = [o.float() for o in student(*inputs)]
            for out, want, name in zip(output, target, mimicked[0]):
                if out.shape != want.shape:
                    raise GraphpruneError(f"the pruned model's tensor in place of '{name}' has shape "
                                          f"{tuple(out.shape[1:])}, the original's {tuple(want.shape[1:])}: it "
                                          "cannot be mimicked")
            loss = mimic_loss(output, target, weights)
        if not torch.isfinite(loss):
            raise GraphpruneError(f"recovery diverged at step {step} (loss {loss.item()}); lower recovery.lr",
                                  parameter="recovery.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
        optimizer.step()
        step += 1
        if settings.max_seconds is not None and total > step and step % resize_every == 0:
            # the schedule is resized to the steps that fit the time left, on the pace so far: after
            # the first steps (a few steps at the top of a cosine barely differ from its start), then
            # every tenth of the schedule, shorter only, should the steps slow down (other load)
            per_step = (time.perf_counter() - start) / step
            fit = max(step + 1, min(total, int(settings.max_seconds / per_step)))
            if fit != total:
                total = fit
                schedule = _schedule(settings.schedule, total)
                bar.total = total
                if guard is not None:
                    checkpoints = checkpoint_steps(total, EARLY_STOP_CHECKPOINTS)
            resize_every = max(TIMED_STEPS, total // 10)
        stalled = False
        if guard is not None and step in checkpoints:
            guard.check(step)
            stalled = guard.stalled(EARLY_STOP_PATIENCE) and step < total
            student.train()
        window.append(loss.item())
        if len(window) == max(1, total // 50) or step == total:
            curve.append({"step": step, "loss": sum(window) / len(window)})
            bar.set_postfix_str(f"loss {curve[-1]['loss']:.4g}")
            window = []
        bar.update(1)
        if stalled:
            break
    bar.close()
    early_stop = diverged = None
    if guard is not None:
        guard.restore()
        early_stop = {"best_step": guard.best_step, "holdout_images": len(holdout), "signal": signal,
                      "checkpoints": guard.history,
                      "stopped_at": step if step < total else None}
    if at_start is not None:
        began, ended = at_start.best, at_start.check(step)
        if not ended <= began:  # NaN too
            at_start.restore()
            diverged = {"train_error_start": began, "train_error_end": ended}
    for p in student.parameters():
        p.requires_grad_(False)
    if fmt is not None:
        full.to(memory_format=torch.contiguous_format)
    full.eval()
    student_model.graph_module = full.to("cpu")
    record = {"settings": asdict(settings), "targets": [t.node for t in targets], "trained_tensors": len(params),
              "mimicked_nodes": {"original": mimicked[0], "pruned": mimicked[1]},
              "frozen_prefix": frozen_until if split is not None else None, "iterations_run": step,
              "loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else None, "early_stop": early_stop,
              "kept_start_as_training_raised_its_error": diverged,
              "train_images": len(images), "batch_size": batch_size,  # fewer than asked where memory is short
              "seconds": round(time.perf_counter() - start, 2)}
    return student_model, record


TIMED_STEPS = 3  # steps timed before a time budget sizes the schedule
EARLY_STOP_CHECKPOINTS = 10
# Training stops once this many checkpoints in a row fail to lower the best held-out error: half the
# schedule with nothing gained. EfficientNet-Lite0 at 22% (crop 0.875, seed 2021) trained 1029 steps
# (24.6 of its 39.1 minutes) and kept the start, every checkpoint worse; in lite0_recovery at the default
# lr the held-out error stayed above the start at all 10 checkpoints, at lr 1e-4 it fell at each one.
EARLY_STOP_PATIENCE = 5


def _large_images(mode: str, size) -> bool:
    """"auto" means on for large images only (above 64 px): the prefix is frozen where its early
    high-resolution layers cost most of a step (224 px), and recovery stops early where a network of
    that size can fit a tiny set without generalising; CIFAR-size models train whole and to the
    end, as PRACTISE does."""
    return mode == "on" or (mode == "auto" and max(int(size[0]), int(size[1])) > 64)


def check_recovery(teacher: Model, train: TinySet, settings: RecoverySettings, feature_node: str | None = None) -> None:
    """Refuse, with a one-line error, settings that ``recover`` would refuse, before anything runs:
    a pipeline calls this first so that a bad setting does not cost the scoring before it."""
    _check(settings, train)
    augmenter(settings.augment, train.images.shape[-2:])
    targets = mimic_targets(teacher, feature_node)  # an unknown feature_node or no target: one line now
    if settings.loss == "mimic" and settings.target == "feature-map":
        for name in target_names(teacher.graph_module, targets):
            feature_map(teacher, name)


def _check(settings: RecoverySettings, train: TinySet) -> None:
    if settings.iterations < 0 or settings.batch_size <= 0 or not 0 < settings.lr <= MAX_LR:
        raise GraphpruneError(f"recovery needs iterations >= 0, batch size > 0 and lr in (0, {MAX_LR:g}]")
    if settings.target not in ("features", "feature-map", "auto"):
        raise GraphpruneError(f"unknown recovery target '{settings.target}' (features, feature-map or auto)")
    if settings.loss not in ("mimic", "label"):
        raise GraphpruneError(f"unknown recovery loss '{settings.loss}' (mimic or label)")
    if settings.loss == "label" and not train.has_labels:
        raise GraphpruneError("label recovery needs labelled images")
    if settings.optimizer not in ("sgd", "adam"):
        raise GraphpruneError(f"unknown optimizer '{settings.optimizer}' (sgd or adam)")
    for name in ("freeze_prefix", "early_stop"):
        if getattr(settings, name) not in ("auto", "on", "off"):
            raise GraphpruneError(f"unknown {name} '{getattr(settings, name)}' (auto, on or off)",
                                  parameter=f"recovery.{name}")
    if settings.max_seconds is not None and settings.max_seconds <= 0:
        raise GraphpruneError("recovery.max_seconds must be > 0", parameter="recovery.max_seconds")
    check_precision(settings.precision, "recovery.precision")
    check_device(settings.device, "recovery.device")
    if settings.trainable not in ("all", "bias"):
        raise GraphpruneError(f"unknown recovery.trainable '{settings.trainable}' (all or bias)",
                              parameter="recovery.trainable")
    if settings.schedule not in ("cosine", "step"):
        raise GraphpruneError(f"unknown schedule '{settings.schedule}' (cosine or step)")


def _schedule(kind: str, iterations: int):
    total = max(1, iterations)
    if kind == "step":
        return lambda step: 0.1 if step >= int(0.4 * total) else 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
