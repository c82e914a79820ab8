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

``loss="label"`` is the paper's BP baseline instead: cross-entropy with the labels through the
classifier, whose parameters are then explicitly frozen (``requires_grad=False``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data import TinySet
from ..errors import GraphpruneError
from ..features import (classifier_parameters, feature_map_node_name, mimic_loss, mimic_targets, run_batched,
                        target_names, target_weights, truncate)
from ..model import Model
from ..progress import progress_bar
from .base import PassResult, Transform
from .selection import Selection


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
    augment: str = "auto"  # "crop-flip", "resized-crop-flip", "none" or "auto" (by image size)
    loss: str = "mimic"  # or "label" (cross-entropy, classifier frozen)
    target: str = "features"  # what "mimic" matches: "features", "feature-map" (before pooling) or "auto"
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class RecoveryLog:
    """Artefact: how recovery went (the loss curve of ``{step, loss}`` points, the last loss, seconds)."""

    loss_curve: list
    final_loss: float | None
    seconds: float


class Recover(Transform):
    """Train the pruned model to mimic ``ctx.original``'s features on every image of ``ctx.tiny``;
    where the ``Selection`` is empty no block was dropped and nothing is trained."""

    name = "recover"
    config_field = "recovery"
    optional = (Selection,)
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
        recovered, record = recover(model, ctx.original, ctx.need("tiny", self.name), self.settings,
                                    ctx.feature_node, ctx.show_progress)
        log = RecoveryLog(record["loss_curve"], record["final_loss"], record["seconds"])
        return PassResult(recovered, changed=self.settings.iterations > 0, record=record, artifacts=[log])


def recover(model: Model, teacher: Model, train: TinySet, settings: RecoverySettings,
            feature_node: str | None = None, show_progress: bool = True) -> tuple[Model, dict]:
    """A trained copy of ``model`` and a record (loss curve, time)."""
    _check(settings, train)  # the augmentation and the maps are checked where they are built below
    student_model = model.clone()
    device = torch.device(settings.device)
    targets = mimic_targets(teacher, feature_node)
    mimicked = _mimicked_nodes(teacher, student_model, targets, settings)
    teacher_gm = truncate(teacher.clone().graph_module, mimicked[0]).to(device).eval()
    full = student_model.graph_module.to(device)
    if settings.loss == "label":
        student, frozen = full, {id(p) for p in classifier_parameters(student_model)}
    else:
        student, frozen = truncate(full, mimicked[1]), set()
    params = [p for p in student.parameters() if p.is_floating_point() and id(p) not in frozen]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen and p.is_floating_point())
    if not params:
        raise GraphpruneError("nothing to train: the pruned model has no trainable weights")
    if settings.optimizer == "adam":
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    schedule = _schedule(settings)
    gen = torch.Generator().manual_seed(settings.seed)
    images, labels = train.images, train.labels
    # one target weighs 1; several are weighted by their scale on the tiny set (features.py)
    weights = [1.0] if len(mimicked[0]) == 1 else target_weights(run_batched(teacher_gm, images.to(device)))
    augment = _augmenter(settings.augment, images.shape[-2:])
    curve, window = [], []
    start = time.perf_counter()
    bar = progress_bar(total=settings.iterations, desc="recovery", enabled=show_progress)
    student.train()
    for step in range(settings.iterations):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * schedule(step)
        index = torch.randint(0, len(images), (min(settings.batch_size, len(images)),), generator=gen)
        batch = augment(images[index], gen).to(device)
        if settings.loss == "label":
            loss = F.cross_entropy(student(batch), labels[index].to(device))
        else:
            with torch.no_grad():
                target = teacher_gm(batch)
            output = student(batch)
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
        window.append(loss.item())
        if len(window) == max(1, settings.iterations // 50) or step == settings.iterations - 1:
            curve.append({"step": step + 1, "loss": sum(window) / len(window)})
            bar.set_postfix_str(f"loss {curve[-1]['loss']:.4g}")
            window = []
        bar.update(1)
    bar.close()
    for p in student.parameters():
        p.requires_grad_(False)
    full.eval()
    student_model.graph_module = full.to("cpu")
    record = {"settings": asdict(settings), "targets": [t.node for t in targets], "trained_tensors": len(params),
              "mimicked_nodes": {"original": mimicked[0], "pruned": mimicked[1]},
              "loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else None,
              "train_images": len(images), "seconds": round(time.perf_counter() - start, 2)}
    return student_model, record


def _mimicked_nodes(teacher: Model, student: Model, targets, settings: RecoverySettings) -> tuple[list, list]:
    """(teacher nodes, student nodes) whose outputs are compared, one pair per target. A target is
    found in the pruned model through the layer that reads it (``target_names``), but the map
    before it may be a dropped block's output, so each model's map is found from its own target."""
    teacher_nodes = target_names(teacher.graph_module, targets)
    student_nodes = target_names(student.graph_module, targets)
    if settings.target == "features" or settings.loss == "label":
        return teacher_nodes, student_nodes
    pairs = []
    for t, s in zip(teacher_nodes, student_nodes):
        if settings.target == "auto":
            maps = feature_map_node_name(teacher, t), feature_map_node_name(student, s)
            pairs.append((t, s) if None in maps else maps)
        else:
            pairs.append((_feature_map(teacher, t), _feature_map(student, s)))
    return [t for t, _ in pairs], [s for _, s in pairs]


def _feature_map(model: Model, feature: str) -> str:
    name = feature_map_node_name(model, feature)
    if name is None:
        raise GraphpruneError(f"recovery target 'feature-map': '{feature}' is not pooled or reshaped from a "
                              "larger tensor without weights; use the target 'features'")
    return name


def check_recovery(teacher: Model, train: TinySet, settings: RecoverySettings, feature_node: str | None = None) -> None:
    """Refuse, with a one-line error, settings that ``recover`` would refuse, before anything runs:
    a pipeline calls this first so that a bad setting does not cost the scoring before it."""
    _check(settings, train)
    _augmenter(settings.augment, train.images.shape[-2:])
    targets = mimic_targets(teacher, feature_node)  # an unknown feature_node or no target: one line now
    if settings.loss == "mimic" and settings.target == "feature-map":
        for name in target_names(teacher.graph_module, targets):
            _feature_map(teacher, name)


def _check(settings: RecoverySettings, train: TinySet) -> None:
    if settings.iterations < 0 or settings.batch_size <= 0 or settings.lr <= 0:
        raise GraphpruneError("recovery needs iterations >= 0, batch size > 0 and lr > 0")
    if settings.target not in ("features", "feature-map", "auto"):
        raise GraphpruneError(f"unknown recovery target '{settings.target}' (features, feature-map or auto)")
    if settings.loss not in ("mimic", "label"):
        raise GraphpruneError(f"unknown recovery loss '{settings.loss}' (mimic or label)")
    if settings.loss == "label" and not train.has_labels:
        raise GraphpruneError("label recovery needs labelled images")
    if settings.optimizer not in ("sgd", "adam"):
        raise GraphpruneError(f"unknown optimizer '{settings.optimizer}' (sgd or adam)")
    if settings.schedule not in ("cosine", "step"):
        raise GraphpruneError(f"unknown schedule '{settings.schedule}' (cosine or step)")


def _schedule(settings: RecoverySettings):
    total = max(1, settings.iterations)
    if settings.schedule == "step":
        return lambda step: 0.1 if step >= int(0.4 * total) else 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total))


def _augmenter(kind: str, size):
    height, width = int(size[0]), int(size[1])
    if kind == "auto":
        kind = "crop-flip" if max(height, width) <= 64 else "resized-crop-flip"
    if kind == "none":
        return lambda x, gen: x
    if kind == "crop-flip":
        pad = max(1, min(height, width) // 8)
        return lambda x, gen: _flip(_padded_crop(x, pad, gen), gen)
    if kind == "resized-crop-flip":
        return lambda x, gen: _flip(_resized_crop(x, gen), gen)
    raise GraphpruneError(f"unknown augmentation '{kind}' (auto, crop-flip, resized-crop-flip, none)")


def _padded_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.35, 1.0)) -> torch.Tensor:
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        area = h * w * float(torch.empty(1).uniform_(*scale, generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x
