"""What recovery trains and compares: the pruned model's parts and the held-out guard's signal.

* :func:`mimicked_nodes`: the (teacher, student) node pairs whose outputs are compared, one per
  mimicking target (``target="feature-map"``: the map before pooling, :func:`feature_map`).
* :func:`split_at`: the prefix both models compute alike before the first gap (run once, not
  trained), and each one's suffix; :func:`trainable_parameters` and :func:`used_tensors`: the
  weights a truncated graph reads (a truncated copy keeps every module).
* :func:`holdout_signal`: what early stopping compares on held-out images, a classifier's class KL
  or the mimicked feature error (:func:`holdout_error`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from ..errors import GraphpruneError
from ..features import cached_suffix, feature_map_node_name, mimic_loss, run_batched, target_names, truncate
from ..fidelity import class_kl, output_layout
from ..model import Model, first_tensor
from ..ops import fetch_attr

if TYPE_CHECKING:
    from .recover import RecoverySettings


def split_at(student: fx.GraphModule, teacher: fx.GraphModule, start: str, mimicked, input_shapes=None):
    """(shared prefix, teacher suffix, student suffix) at node ``start`` where both graphs compute
    ``start`` with the same code and weights (the pruned model before its first gap), so that one
    prefix run serves both and the prefix is not trained; None where they differ or ``start`` is a
    tuple. Where the targets also read earlier values by another path (a neck's long shortcut, as
    in PP-OCRv4's recogniser or a YOLO neck), the prefix computes the cut before ``start``
    (:func:`~graphprune.features.cached_suffix`: ``start`` and those values) and the suffixes take
    them all, as scoring's cache does; the prefix returns the cut's values as a tuple."""
    if start not in {n.name for n in student.graph.nodes}:
        return None
    found = (cached_suffix(teacher, start, mimicked[0], input_shapes),
             cached_suffix(student, start, mimicked[1], input_shapes))
    if None in found or found[0][0] != found[1][0]:
        return None
    cut, suffixes = found[1][0], (found[0][1], found[1][1])
    prefixes = truncate(student, cut), truncate(teacher, cut)
    if prefixes[0].code != prefixes[1].code:
        return None
    mine, theirs = used_tensors(prefixes[0]), used_tensors(prefixes[1])
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        return None
    return prefixes[1].eval(), suffixes[0].eval(), suffixes[1]


def trainable_parameters(student: fx.GraphModule, frozen: set, which: str = "all") -> list[torch.nn.Parameter]:
    """The float weights ``student``'s graph reads (a truncated copy keeps every module, the frozen
    prefix's too), but for those in ``frozen``; with ``which="bias"`` only the biases."""
    used = {id(t) for name, t in used_tensors(student).items() if which == "all" or name.endswith("bias")}
    return [p for p in student.parameters() if p.is_floating_point() and id(p) not in frozen and id(p) in used]


def used_tensors(gm: fx.GraphModule) -> dict:
    """The weights and buffers ``gm``'s graph reads (a truncated copy keeps every module)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)  # parameters themselves (state_dict detaches them)
            found.update({f"{node.target}.{k}": v for k, v in [*module.named_parameters(), *module.named_buffers()]})
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                found[node.target] = value
    return found


def mimicked_nodes(teacher: Model, student: Model, targets, settings: "RecoverySettings") -> tuple[list, list]:
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
            pairs.append((feature_map(teacher, t), feature_map(student, s)))
    return [t for t, _ in pairs], [s for _, s in pairs]


def feature_map(model: Model, feature: str) -> str:
    name = feature_map_node_name(model, feature)
    if name is None:
        raise GraphpruneError(f"recovery target 'feature-map': '{feature}' is not pooled or reshaped from a "
                              "larger tensor without weights; use the target 'features'")
    return name


def holdout_signal(images: torch.Tensor, prefix, teacher: fx.GraphModule, student: fx.GraphModule, weights,
                    teacher_full: fx.GraphModule, full: fx.GraphModule):
    """(name, error function) of what the guard compares on held-out images. Where the model
    classifies (``fidelity.output_layout``), its class distributions: KL(original || pruned) of the
    whole network's first output (``fidelity.class_kl``). Mimicking lowers the feature error while
    it can raise this: on EfficientNet-Lite0 (``benchmarks/studies/lite0_guard.py``, Block
    Influence's 4 blocks, 400 steps) the held-out feature error fell 24% and the logits' L2 error
    14% while the held-out KL rose from 0.40 to 1.05 and top-1 on 800 other photos fell from 76.25
    to 73.75; the 40 photos' KL followed the 800's (0.36 -> 0.96). Elsewhere (a detector, a
    segmentation map), the mimicked feature error."""
    reference = first_tensor(run_batched(teacher_full, images))
    if output_layout(reference) != "classes":
        return "feature error", holdout_error(images, prefix, teacher, student, weights)

    def error() -> float:
        with torch.no_grad():
            return class_kl(first_tensor(run_batched(full, images)), reference)
    return "output KL", error


def holdout_error(images: torch.Tensor, prefix, teacher: fx.GraphModule, student: fx.GraphModule, weights):
    """The student's float32 feature error on held-out images, in eval mode (teacher targets and the
    frozen prefix's activations computed once)."""
    inputs = run_batched(prefix, images) if prefix is not None else images
    targets = run_batched(teacher, inputs)

    def error() -> float:
        student.eval()
        with torch.no_grad():
            return float(mimic_loss(run_batched(student, inputs), targets, weights))
    return error
