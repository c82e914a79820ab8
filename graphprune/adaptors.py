"""Identity-initialised linear adaptors on graph edges, and folding them into their neighbours.

An adaptor is a bias-free channel-mixing linear map ``A`` (a 1x1 conv on ``N, C, ...`` tensors, a
linear layer on channel-last tensors) initialised to the identity, so inserting it changes nothing
until it is trained. PRACTISE places adaptors around a dropped block so that the rest of the
network can compensate linearly (see :mod:`graphprune.passes.recoverability`).

Folding: an adaptor ``A`` feeding a conv ``W`` (1 group, no padding-dependent bias issue since
``A`` has no bias) is ``W' = W (I ⊗ A)``: ``W'[o, i] = sum_c W[o, c] A[c, i]``; an adaptor applied
to a conv's output is ``W' = A W``, ``b' = A b``. Both leave the graph exactly as it was before the
adaptor was inserted, with new weights, so folding costs no latency.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .formats.batch_axis import BATCH_AXIS
from .ops import op_kind


class Adaptor(nn.Module):
    """``y = A x`` along ``dim`` (1 for N,C,... tensors, -1 for channel-last), ``A`` = identity."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.eye(channels))

    def forward(self, x):
        if self.dim == -1 or self.dim == x.dim() - 1:
            return x @ self.weight.t()
        return torch.einsum("oc,nc...->no...", self.weight, x)


def channel_dim(node: fx.Node, gm: fx.GraphModule, shape: tuple[int, ...]) -> int:
    """Which axis holds channels: 1 when a conv reads or writes the tensor (or for 4-D+ tensors),
    else the last axis (token/channel-last tensors read by linear layers)."""
    neighbours = [node, *node.users]
    kinds = {op_kind(n, gm) for n in neighbours}
    if "conv" in kinds:
        return 1
    if kinds & {"linear", "matmul", "layer_norm"}:
        return -1
    return 1 if len(shape) >= 4 else -1


def insert_adaptor(gm: fx.GraphModule, producer: fx.Node, consumers: list[fx.Node], channels: int,
                   dim: int, name: str) -> fx.Node:
    """Insert ``name = Adaptor(producer)`` and make ``consumers`` read it instead of ``producer``."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    gm.add_submodule(name, Adaptor(channels, dim).to(device))
    with gm.graph.inserting_after(producer):
        node = gm.graph.call_module(name, (producer,))
    if BATCH_AXIS in producer.meta:  # its value is the producer's, batch axis and all
        node.meta[BATCH_AXIS] = producer.meta[BATCH_AXIS]
    for consumer in consumers:
        consumer.replace_input_with(producer, node)
    return node


def adaptor_parameters(gm: fx.GraphModule) -> list[nn.Parameter]:
    return [m.weight for m in gm.modules() if isinstance(m, Adaptor)]


def remove_adaptors(gm: fx.GraphModule) -> None:
    """Take every adaptor out of the graph (readers read the adaptor's input again)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Adaptor):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


@torch.no_grad()
def fold_adaptors(gm: fx.GraphModule) -> list[str]:
    """Fold each adaptor into the conv or linear it feeds or follows, when that is exact; remove
    the folded adaptors. Returns the names of adaptors that could not be folded (left in place)."""
    unfolded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Adaptor):
            continue
        adaptor = gm.get_submodule(node.target)
        producer = node.args[0]
        if _fold_into_readers(gm, node, adaptor) or _fold_into_writer(gm, producer, node, adaptor):
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
        else:
            unfolded.append(str(node.target))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return unfolded


def _linear_module(gm: fx.GraphModule, node: fx.Node):
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module
    if isinstance(module, nn.Linear):
        return module
    return None


def _fold_into_readers(gm, node, adaptor) -> bool:
    """Every reader is a conv/linear reading only the adaptor: W' = W A."""
    readers = list(node.users)
    modules = [_linear_module(gm, r) for r in readers]
    if not readers or any(m is None or r.args[0] is not node for m, r in zip(modules, readers)):
        return False
    if any(len(m.weight.shape) == 4 and adaptor.dim != 1 for m in modules):
        return False
    for module in modules:
        w = module.weight
        if w.dim() == 4:
            module.weight.copy_(torch.einsum("ockl,ci->oikl", w, adaptor.weight))
        else:
            module.weight.copy_(w @ adaptor.weight)
    return True


def _fold_into_writer(gm, producer, node, adaptor) -> bool:
    """The adaptor's input comes only from a conv/linear: W' = A W, b' = A b."""
    module = _linear_module(gm, producer)
    if module is None or len(producer.users) != 1:
        return False
    w = module.weight
    if w.dim() == 4:
        module.weight.copy_(torch.einsum("io,ockl->ickl", adaptor.weight, w))
    else:
        module.weight.copy_(adaptor.weight @ w)
    if module.bias is not None:
        module.bias.copy_(adaptor.weight @ module.bias)
    return True
