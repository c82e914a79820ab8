"""The feature tensor PRACTISE mimics, and graphs that compute it.

The *classifier* is the last weighted op (linear, matmul, conv) on the way to the output; the
*features* are its input (the pooled, flattened tensor for a CNN; the class token for a ViT). Both
recoverability and recovery compare features before the classifier, so the classifier is never
part of what is trained. ``feature_node`` overrides the choice by fx node name (or ONNX node name).

The *feature map* is what the features are read from without weights: walking back from the
features through weight-free nodes of one tensor input (flatten, reshape, pooling, token select),
the first tensor with more elements per image than the node that reads it (the 64x8x8 map a CIFAR
ResNet pools into its 64 features). Mimicking the map gives more targets per image, and the
features follow from it (the reduction is fixed).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import fx

from .errors import GraphpruneError
from .graph_stats import node_stats
from .model import Model
from .ops import ancestors, constant_nodes, is_multi_output, is_weighted


def classifier_node(model: Model) -> fx.Node:
    """The last weighted node the output depends on."""
    gm = model.graph_module
    constants = constant_nodes(gm)
    live = ancestors(gm.graph.output_node())
    candidates = [n for n in gm.graph.nodes if n in live and n not in constants and is_weighted(n, gm, constants)]
    if not candidates:
        raise GraphpruneError("cannot find a classifier (a final linear, matmul or conv layer)")
    return candidates[-1]


def feature_node_name(model: Model, override: str | None = None) -> str:
    """The fx node whose output is the feature tensor (see the module docstring)."""
    gm = model.graph_module
    if override:
        for node in gm.graph.nodes:
            if override in (node.name, node.meta.get("onnx_name"), str(node.target)):
                return node.name
        raise GraphpruneError(f"feature_node '{override}' is not a node of the model", parameter="feature_node")
    classifier = classifier_node(model)
    constants = constant_nodes(gm)
    inputs = [i for i in classifier.all_input_nodes if i not in constants]
    if not inputs:
        raise GraphpruneError("the classifier reads no tensor input")
    return inputs[0].name


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


def truncate(gm: fx.GraphModule, output: str) -> fx.GraphModule:
    """A GraphModule (sharing ``gm``'s modules and weights) that returns node ``output``."""
    graph = _plain_copy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    if output not in nodes:
        raise GraphpruneError(f"node '{output}' is not in the graph")
    old = graph.output_node()
    with graph.inserting_after(old):
        graph.output(nodes[output])
    graph.erase_node(old)
    return _without_dead_code(fx.GraphModule(gm, graph))


def suffix_from(gm: fx.GraphModule, start: str, output: str) -> fx.GraphModule | None:
    """A GraphModule computing ``output`` from node ``start``'s value (its only input), or
    ``None`` when ``output`` also depends on the graph inputs by another path or ``start``'s value
    is a tuple (a Split's outputs), which the suffix could not be fed as one batch of tensors."""
    graph = _plain_copy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    if is_multi_output(nodes[start]):
        return None
    old_out = graph.output_node()
    with graph.inserting_after(old_out):
        graph.output(nodes[output])
    graph.erase_node(old_out)
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        placeholder = graph.placeholder("activation")
    nodes[start].replace_all_uses_with(placeholder)
    suffix = _without_dead_code(fx.GraphModule(gm, graph))
    others = [n for n in suffix.graph.nodes if n.op == "placeholder" and n.name != placeholder.name]
    if any(n.users for n in others):
        return None
    for node in others:
        suffix.graph.erase_node(node)
    suffix.recompile()
    return suffix


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


@torch.no_grad()
def run_batched(gm: fx.GraphModule, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``gm`` on ``images`` in eval mode, in batches, concatenated."""
    was_training = gm.training
    gm.eval()
    try:
        outs = [gm(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        gm.train(was_training)
    return torch.cat(outs)
