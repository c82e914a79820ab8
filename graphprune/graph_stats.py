"""Per-node shapes, MACs and parameter counts from one run of the graph.

Runs the fx graph once on an example input (batch 1 at the analysis shape) with an
``fx.Interpreter`` and counts each node's multiply-accumulates with ``torch.utils.flop_counter``
(MACs = FLOPs / 2), so every op the front end emits is counted the same way. Read-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from .model import Model


@dataclass(frozen=True)
class NodeStats:
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    macs: int


class _StatsInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.stats: dict[str, NodeStats] = {}

    def run_node(self, n: fx.Node):
        if n.op in ("call_function", "call_method", "call_module"):
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            macs = counter.get_total_flops() // 2
        else:
            result = super().run_node(n)
            macs = 0
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        dtype = result.dtype if isinstance(result, torch.Tensor) else None
        self.stats[n.name] = NodeStats(shape, dtype, int(macs))
        return result


def node_stats(model: Model) -> dict[str, NodeStats]:
    """Shape, dtype and MACs of every node's output at batch size 1.

    Runs with autograd enabled: without it, ``nn.MultiheadAttention`` takes a fused fast path
    that the FLOP counter cannot see into.
    """
    gm = model.graph_module
    was_training = gm.training
    gm.eval()
    try:
        interp = _StatsInterpreter(gm)
        with torch.enable_grad():
            interp.run(*model.example_inputs(batch_size=1))
    finally:
        gm.train(was_training)
    return interp.stats


def model_macs(model: Model) -> int:
    """The MACs of one forward pass at batch size 1 (:func:`node_stats`, summed)."""
    return sum(s.macs for s in node_stats(model).values())


def node_weight_tensors(node: fx.Node, gm: fx.GraphModule) -> list[torch.Tensor]:
    """The parameters and constant tensors a node reads directly (its own weights)."""
    from .ops import fetch_attr

    tensors = []
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        tensors.extend(module.parameters())
    for inp in node.all_input_nodes:
        if inp.op == "get_attr":
            value = fetch_attr(gm, inp.target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                tensors.append(value)
    return tensors


def count_params(nodes, gm: fx.GraphModule) -> int:
    """Distinct weight elements read by ``nodes`` (a shared tensor counts once)."""
    seen: dict[int, int] = {}
    for node in nodes:
        for tensor in node_weight_tensors(node, gm):
            seen[id(tensor)] = tensor.numel()
    return sum(seen.values())


class _Recorder(fx.Interpreter):
    """Runs the graph (freeing each value after its last use), keeping ``keep(node, value)``."""

    def __init__(self, gm: fx.GraphModule, keep):
        super().__init__(gm)
        self.keep, self.kept = keep, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        kept = self.keep(n, result)
        if kept is not None:
            self.kept[n] = kept
        return result


@torch.no_grad()
def record_nodes(gm: fx.GraphModule, inputs, keep) -> dict[fx.Node, object]:
    """``keep(node, value)`` of every node, where not None, in one eval-mode run of ``gm`` on
    ``inputs`` (no value is held past its last use unless ``keep`` returns it)."""
    was_training = gm.training
    gm.eval()
    try:
        recorder = _Recorder(gm, keep)
        recorder.run(*inputs)
    finally:
        gm.train(was_training)
    return recorder.kept


def node_values(model: Model, nodes) -> dict[fx.Node, object]:
    """The values of ``nodes`` in one eval-mode run on the example input (batch 1)."""
    wanted = set(nodes)
    return record_nodes(model.graph_module, model.example_inputs(batch_size=1),
                        lambda node, value: value if node in wanted else None)


@torch.no_grad()
def run_node_with(gm: fx.GraphModule, node: fx.Node, values: list) -> object:
    """What ``node`` computes when its argument slots (in :func:`graphprune.ops.tensor_args`
    order, constants included) hold ``values``."""
    slots = iter(values)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda _: next(slots))
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)
