"""What feature mimicking compares (the *targets*), and graphs that compute them.

**Targets.** For every graph output, its *last trained layers*: the weighted ops (conv, linear,
matmul) it is reached from without passing another trained one; a layer whose weights are fixed by
construction (every weight an integer, as a detector's DFL integral conv over 0..15 or an
identity) is looked through, not stopped at. The targets are those layers' tensor inputs, but
where a layer's output is added on its way to an output to a value not computed from it (it ends a
residual branch: a feature extractor with no trained layer after its last block) the target is that
output itself, which dropping the block leaves in place (:func:`residual_outputs`). A
classifier has one: the pooled, flattened features before its last linear (the class token for a
ViT). A detector gets the inputs of its class and box convs at every scale; a segmentation or OCR
model those of its head. Every trained layer is then outside what is compared, so it is never
trained. ``feature_node`` overrides the choice with a comma-separated list of fx or ONNX node names.

A target is remembered by the layer that reads it (and the argument slot): in a pruned model the
tensor that layer now reads is the one compared, even where the node the original had there was a
dropped block's output.

**Loss.** Each target's mean squared error is weighted by ``mean(s) / s_t``, ``s_t`` the mean
square of the original's target ``t``, so that none dominates by its scale:

    L = 1/T sum_t  mean(s)/s_t * MSE_t

With one target the weight is 1 and ``L`` is that target's plain MSE.

The *feature map* is what a target is read from without weights: walking back from it through
weight-free nodes of one tensor input (flatten, reshape, pooling, token select), the first tensor
with more elements per image than the node that reads it (the 64x8x8 map a CIFAR ResNet pools into
its 64 features). Mimicking the map gives more targets per image, and the features follow from it
(the reduction is fixed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .errors import GraphpruneError
from .formats.batch_axis import BATCH_AXIS
from .graph_stats import node_stats
from .model import Model
from .ops import (ancestors, constant_nodes, fetch_attr, is_binary_add, is_multi_output, is_weighted, module_parameters,
                  reads_shape_only, tensor_args)


@dataclass(frozen=True)
class Target:
    """A mimicked tensor: node ``node`` of the original, read by trained layer ``reader`` in
    argument slot ``slot`` (``reader`` is None for a node the user named)."""

    node: str
    reader: str | None = None
    slot: int = 0


def classifier_node(model: Model) -> fx.Node:
    """The last weighted node the output depends on (the layer label recovery keeps frozen)."""
    gm = model.graph_module
    constants = constant_nodes(gm)
    live = ancestors(gm.graph.output_node())
    candidates = [n for n in gm.graph.nodes if n in live and n not in constants and is_weighted(n, gm, constants)]
    if not candidates:
        raise GraphpruneError("cannot find a classifier (a final linear, matmul or conv layer)")
    return candidates[-1]


def has_fixed_weights(node: fx.Node, gm: fx.GraphModule, constants: set[fx.Node]) -> bool:
    """Every weight ``node`` reads is an integer: set by construction (an arange, an identity),
    not by training, which never lands every weight on an integer."""
    weights = [p for p in module_parameters(node, gm) if p.is_floating_point()]
    weights += [fetch_attr(gm, i.target) for i in node.all_input_nodes if i in constants and i.op == "get_attr"]
    weights = [w for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()]
    return bool(weights) and all(bool((w == w.round()).all()) for w in weights)


def last_trained_layers(model: Model) -> list[fx.Node]:
    """For every graph output, the trained weighted nodes it is reached from without passing
    another one (fixed-weight layers are looked through), in graph order."""
    gm = model.graph_module
    constants = constant_nodes(gm)
    found, seen = set(), set()
    stack = [n for n in gm.graph.output_node().all_input_nodes if n not in constants]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_weighted(node, gm, constants) and not has_fixed_weights(node, gm, constants):
            found.add(node)
        else:
            stack.extend(i for i in node.all_input_nodes if i not in constants)
    return [n for n in gm.graph.nodes if n in found]


def residual_outputs(layer: fx.Node, gm: fx.GraphModule, constants: set) -> list[fx.Node]:
    """The graph output values ``layer`` reaches without passing another trained layer, where on the
    way its output is added to a value not computed from it (``layer`` ends a residual branch, as
    the last conv of a feature extractor's last block does: dropping that block removes it, and the
    output itself is what stays comparable); else []."""
    downstream, merged = {layer}, False
    for node in gm.graph.nodes:  # topological order
        if node in downstream or node.op == "output" or not any(i in downstream for i in node.all_input_nodes):
            continue
        if is_weighted(node, gm, constants) and not has_fixed_weights(node, gm, constants):
            continue  # another trained layer: the outputs behind it are its own
        downstream.add(node)
        merged |= is_binary_add(node, gm) and any(i not in downstream and i not in constants
                                                  for i in node.all_input_nodes)
    if not merged:
        return []
    return [value for value in gm.graph.output_node().all_input_nodes if value in downstream and value is not layer]


def mimic_targets(model: Model, override: str | None = None) -> list[Target]:
    """The targets (see the module docstring), or the nodes ``override`` names (comma-separated)."""
    gm = model.graph_module
    if override:
        names = [part.strip() for part in override.split(",") if part.strip()]
        if not names:
            raise GraphpruneError(f"feature_node '{override}' names no node", parameter="feature_node")
        return [Target(_node_named(gm, name)) for name in dict.fromkeys(names)]
    constants = constant_nodes(gm)
    targets: list[Target] = []
    for layer in last_trained_layers(model):
        ends = residual_outputs(layer, gm, constants)
        found = [Target(value.name) for value in ends] if ends else \
            [Target(value.name, layer.name, slot) for slot, value in enumerate(tensor_args(layer))
             if value not in constants and value.op != "placeholder"]
        targets += [t for t in found if t.node not in {t.node for t in targets}]
    if not targets:
        raise GraphpruneError("the model's outputs have no trained layer behind them (a conv, linear or matmul "
                              "whose weights are not fixed), so there is nothing to mimic; name the tensors "
                              "with feature_node", parameter="feature_node")
    return targets


def target_names(gm: fx.GraphModule, targets: Sequence[Target]) -> list[str]:
    """The nodes of ``gm`` (the original or a pruned copy) whose values are compared for
    ``targets``: what each target's reader reads there, else the node of the target's name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = []
    for target in targets:
        reader = nodes.get(target.reader) if target.reader else None
        if reader is not None and len(tensor_args(reader)) > target.slot:
            names.append(tensor_args(reader)[target.slot].name)
        elif target.node in nodes:
            names.append(target.node)
        else:
            raise GraphpruneError(f"the mimicked tensor '{target.node}' is gone from the pruned model "
                                  "(a dropped block computed it); name other tensors with feature_node",
                                  parameter="feature_node")
    return names


def describe_targets(model: Model, override: str | None = None) -> list[dict]:
    """The targets for a report: fx node, ONNX node name where the model came from a file, and the
    trained layer that reads it."""
    nodes = {n.name: n for n in model.graph_module.graph.nodes}
    return [{"node": t.node, "onnx_name": nodes[t.node].meta.get("onnx_name"), "read_by": t.reader}
            for t in mimic_targets(model, override)]


def feature_node_name(model: Model, override: str | None = None) -> str:
    """The first target's node (a classifier's features: its only one)."""
    return mimic_targets(model, override)[0].node


def target_weights(teacher_values: Sequence[torch.Tensor]) -> list[float]:
    """``mean(s) / s_t`` per target (the module docstring's loss)."""
    scales = [float(t.float().pow(2).mean()) or 1.0 for t in teacher_values]
    mean = sum(scales) / len(scales)
    return [mean / s for s in scales]


def mimic_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The module docstring's ``L`` for one batch of student and teacher target values."""
    return sum(w * F.mse_loss(s, t) for s, t, w in zip(student, teacher, weights)) / len(weights)


def feature_map_node_name(model: Model, feature: str) -> str | None:
    """The fx node whose output is the feature map behind node ``feature`` (see the module
    docstring), or ``None`` where the features are read through weights or several inputs."""
    gm = model.graph_module
    constants = constant_nodes(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    # elements per image of each tensor-valued node (graph_stats runs at batch 1)
    sizes = {name: math.prod(stat.shape) for name, stat in node_stats(model).items() if stat.shape}
    node = nodes[feature]
    while not is_weighted(node, gm, constants):
        inputs = [i for i in node.all_input_nodes if i not in constants]
        if len(inputs) != 1 or inputs[0].op == "placeholder" or inputs[0].name not in sizes:
            return None
        previous = inputs[0]
        if sizes[previous.name] > sizes.get(node.name, sizes[previous.name]):
            return previous.name
        node = previous
    return None


def classifier_parameters(model: Model) -> list[torch.nn.Parameter]:
    """Parameters read by the classifier node (frozen during recovery)."""
    gm = model.graph_module
    node = classifier_node(model)
    params = []
    if node.op == "call_module":
        params.extend(gm.get_submodule(node.target).parameters())
    named = dict(gm.named_parameters())
    for inp in node.all_input_nodes:
        if inp.op == "get_attr" and inp.target in named:
            params.append(named[inp.target])
    return params


def truncate(gm: fx.GraphModule, output: str | Sequence[str]) -> fx.GraphModule:
    """A GraphModule (sharing ``gm``'s modules and weights) that returns node ``output``, or the
    tuple of the nodes a list names, each with its batch first (a sequence-first value's batch axis,
    ``formats.batch_axis.note_batch_axes``, moved to 0)."""
    graph = _plain_copy(gm.graph)
    _return(graph, output)
    return _without_dead_code(fx.GraphModule(gm, graph))


def _return(graph: fx.Graph, output: str | Sequence[str]) -> None:
    """Make ``graph`` return node ``output``, or the tuple of the nodes a list names, batch first."""
    old = graph.output_node()
    values = _outputs(graph, output)
    with graph.inserting_before(old):
        values = fx.node.map_arg(values, _batch_first)
    with graph.inserting_after(old):
        graph.output(values)
    graph.erase_node(old)


def _batch_first(node: fx.Node) -> fx.Node:
    """``node``, or where its batch is on another axis, that axis moved to 0 (inserted where the
    graph inserts)."""
    axis = node.meta.get(BATCH_AXIS)
    return node if not axis else node.graph.call_function(torch.movedim, (node, axis, 0))


def _outputs(graph: fx.Graph, output: str | Sequence[str]):
    nodes = {n.name: n for n in graph.nodes}
    names = [output] if isinstance(output, str) else list(output)
    for name in names:
        if name not in nodes:
            raise GraphpruneError(f"node '{name}' is not in the graph")
    return nodes[output] if isinstance(output, str) else tuple(nodes[name] for name in names)


def suffix_from(gm: fx.GraphModule, start: str | Sequence[str], output: str | Sequence[str],
                input_shapes: Sequence[Sequence[int]] | None = None) -> fx.GraphModule | None:
    """A GraphModule computing ``output`` (a node, or a tuple of the nodes a list names) from node
    ``start``'s value (its only input), or from the values of the nodes a list names (its inputs, in
    that order: a cut, :func:`cut_before`), or ``None`` when ``output`` also depends on the graph
    inputs' *values* by another path or a start's value is a tuple (a Split's outputs), which the
    suffix could not be fed as one batch of tensors.

    A graph input read only for its shape (``x.view(x.size(0), -1)``, exported as Shape -> Gather ->
    Reshape before a classifier) is replaced, given ``input_shapes`` (the graph inputs' shapes in
    placeholder order), by a zero-stride tensor of that shape with ``start``'s batch: the batch axis
    is 0 in both (as :func:`run_batched` assumes of every activation) and the rest of the shape is
    the model's fixed input size."""
    starts = [start] if isinstance(start, str) else list(start)
    graph = _plain_copy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    if any(is_multi_output(nodes[name]) for name in starts):
        return None
    shapes = dict(zip([n.name for n in graph.nodes if n.op == "placeholder"], input_shapes or []))
    _return(graph, output)
    with graph.inserting_before(next(iter(graph.nodes))):
        inputs = [graph.placeholder("activation" if i == 0 else f"activation_{i}") for i in range(len(starts))]
    for name, value in zip(starts, inputs):
        axis = nodes[name].meta.get(BATCH_AXIS)
        if axis:  # fed batch first (as truncate returns it): back to the graph's own axis
            with graph.inserting_after(value):
                value = graph.call_function(torch.movedim, (value, 0, axis))
        nodes[name].replace_all_uses_with(value)
    placeholder = inputs[0]  # its batch stands in for a graph input read only for its shape
    suffix = _without_dead_code(fx.GraphModule(gm, graph))
    others = [n for n in suffix.graph.nodes if n.op == "placeholder" and n not in inputs]
    for node in others:
        if not node.users:
            continue
        if node.name not in shapes or not all(reads_shape_only(user, suffix) for user in node.users):
            return None
        with suffix.graph.inserting_after(placeholder):
            stand_in = suffix.graph.call_function(_batch_shaped, (placeholder, tuple(shapes[node.name])[1:]))
        node.replace_all_uses_with(stand_in)
    for node in others:
        suffix.graph.erase_node(node)
    suffix.recompile()
    return suffix


def cut_before(gm: fx.GraphModule, start: str) -> list[str] | None:
    """Where to cut ``gm`` so that what node ``start`` feeds can run from cached values (the inputs
    of :func:`suffix_from` given the list): ``start``
    first, then every other node a node computed from ``start`` reads by value (a long shortcut: a
    neck's Concat with features from before ``start``), in graph order. None where one of them is
    a tuple (a Split node). Weights and shape arithmetic are not cut:
    they have no batch axis (:func:`graphprune.ops.constant_nodes`)."""
    nodes = list(gm.graph.nodes)
    first = next(n for n in nodes if n.name == start)
    computed_from_start = {first}
    for node in nodes:  # topological order
        if any(i in computed_from_start for i in node.all_input_nodes):
            computed_from_start.add(node)
    constants = constant_nodes(gm)
    read = [n for n in nodes if n not in computed_from_start and n not in constants and n.op != "output"
            and any(user in computed_from_start and user is not first for user in n.users)]
    cut = [first, *read]
    return None if any(is_multi_output(n) for n in cut) else [n.name for n in cut]


def cached_suffix(gm: fx.GraphModule, start: str, output: str | Sequence[str],
                  input_shapes: Sequence[Sequence[int]] | None = None) -> tuple[list[str], fx.GraphModule] | None:
    """``(cut, suffix)``: the graph computing ``output`` from node ``start``'s value alone
    (``cut == [start]``) where the rest reads nothing earlier, else from :func:`cut_before`'s cut (a
    neck's shortcut); None where neither can be cut (a Split at ``start``). What scoring's prefix
    cache and recovery's frozen prefix both run from."""
    suffix = suffix_from(gm, start, output, input_shapes)
    if suffix is not None:
        return [start], suffix
    cut = cut_before(gm, start)
    suffix = suffix_from(gm, cut, output, input_shapes) if cut else None
    return None if suffix is None else (cut, suffix)


def _batch_shaped(activation: torch.Tensor, rest: tuple[int, ...]) -> torch.Tensor:
    """A zero-stride stand-in for a graph input read only for its shape: ``activation``'s batch, then ``rest``."""
    return activation.new_zeros(()).expand(activation.shape[0], *rest)


def _without_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _plain_copy(graph: fx.Graph) -> fx.Graph:
    """A copy with the default code generator (torch.export graphs carry a pytree one that
    expects the original inputs and outputs)."""
    new = copy.deepcopy(graph)
    new._codegen = fx.graph.CodeGen()
    return new


def image_count(tensors) -> int:
    """The images a tuple of per-image tensors holds: the smallest leading size. A value cached
    from inside a network may hold its batch folded into the first axis, ``k`` rows per image,
    image after image (MobileViT's patches, (N * 4, tokens, C); a window attention's windows)."""
    return min(len(t) for t in tensors)


def image_rows(x: torch.Tensor, n: int, index: torch.Tensor) -> torch.Tensor:
    """The rows of images ``index`` of ``x``, which holds ``n`` images (``len(x) // n`` rows each)."""
    k = len(x) // n
    if k == 1:
        return x[index]
    return x[(index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)]


def image_slice(x: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
    """Images ``start`` to ``stop`` of ``x``, which holds ``n`` images (``len(x) // n`` rows each)."""
    k = len(x) // n
    return x[start * k:stop * k]


@torch.no_grad()
def run_batched(gm: fx.GraphModule, images: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int = 128):
    """``gm`` on ``images`` (or on a tuple of inputs, one per graph input, batched alike) in eval
    mode, in batches, concatenated (each element of a tuple output)."""
    inputs = images if isinstance(images, tuple) else (images,)
    n = image_count(inputs)
    was_training = gm.training
    gm.eval()
    try:
        outs = [gm(*(image_slice(x, n, i, i + batch_size) for x in inputs)) for i in range(0, n, batch_size)]
    finally:
        gm.train(was_training)
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _node_named(gm: fx.GraphModule, name: str) -> str:
    """The fx name of the node called ``name`` in fx or in the ONNX file (or a module target)."""
    for node in gm.graph.nodes:
        if name in (node.name, node.meta.get("onnx_name"), str(node.target)):
            return node.name
    raise GraphpruneError(f"feature_node '{name}' is not a node of the model", parameter="feature_node")
