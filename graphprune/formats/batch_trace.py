"""Find where a fixed-batch export folded its batch into constant sizes, by tracing two images.

:mod:`~graphprune.formats.batch_axis` frees a batch of 1 written as the *leading* 1 of a size list.
An exporter tracing at batch 1 also folds it into products: ``nn.MultiheadAttention`` reshapes its
(L, N, E) query to (L, N*heads, E/heads) and its output to (L*N, E), which a fixed-batch export
writes as the constants ``[17, 2, 16]`` and ``[17, 32]``; nothing in them says which size holds N.

:func:`trace_folded_batch` finds out by running the graph node by node on two images, each alone
(batch 1) and both together (batch 2). A tensor the batch-2 run computes correctly is, in memory
order, the two images' tensors interleaved in blocks of ``stride`` elements: the batch's stride.
A reshape only regroups memory order, so its output keeps the batch at that stride, in the axis k
whose inner size ``inner_k`` (the product of the sizes after k) divides the stride and whose own
size is divisible by ``stride / inner_k``. That axis becomes -1 (inferred: its batch-1 size times
the batch) and every other axis its batch-1 size, which at batch 1 is the same reshape.

Where two axes qualify (the stride at a boundary: the batch the innermost part of axis k or the
outermost part of axis k+1, as in the two constants above) the graph after it decides: a choice
stands while every later tensor is still such an interleaving and every node runs; else the trace
goes back to the latest choice with an alternative left (depth first, a bounded number of node
runs). The option the search last moved to for the same sizes and stride is tried first there.

Two more nodes spell out the batch of 1 in constants and are rewritten where they fail at batch 2:
a Concat joining a batch-free constant (a class token, exported as its expand to batch 1) to
batched tensors repeats the constant along their batch axis; a Gather of constant indices from
axis 0 of a tensor holding the images one after another (how the dynamo exporter writes
``as_strided`` after a flatten, Swin's head) takes those indices from every image.

Only the fx graph changes (a reshape's module or size list, a Concat's or Gather's module); the
written ONNX keeps its own constants. A graph holding an op whose output sizes follow the values
(NonZero, NonMaxSuppression) is not traced: its images' tensors differ in size past it. The caller
checks the result with :func:`~graphprune.formats.batch_axis.batch_consistent` and undoes it where
that fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from ..graph_stats import record_nodes
from ..model import Model
from .batch_modules import ConcatRepeatingConstants, GatherEachImage, ReshapeToBatched

_SIZED_ATEN = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
_MAX_RESTARTS = 32  # runs of the graph the search may start again


def trace_folded_batch(model: Model) -> list[Callable[[], None]] | None:
    """Rewrite the constant sizes of ``model`` (one image input, batch 1) so any batch runs; the
    steps that undo it, or None (nothing changed) where the trace finds no consistent rewrite."""
    if len(model.inputs) != 1:
        return None
    if _sizes_follow_values(model.graph_module):
        model.meta["sizes_follow_values"] = True  # optimize's refusal names the cause
        return None
    gm = model.graph_module
    was_training = gm.training
    gm.eval()  # as the model runs: a training-mode BatchNorm refused LeViT's one row, (1, 384)
    try:
        return _trace_folded_batch(model, gm)
    finally:
        gm.train(was_training)


def _trace_folded_batch(model: Model, gm: fx.GraphModule) -> list[Callable[[], None]] | None:
    one, other = model.example_inputs(batch_size=1, seed=0), model.example_inputs(batch_size=1, seed=1)
    try:
        with torch.no_grad():
            seen = _seen_alone(gm, one[0], other[0])
    except Exception:
        return None
    trace = _Trace(gm, seen, torch.cat([one[0], other[0]]))
    with torch.no_grad():
        done = trace.run()
    steps = [choice[2] for choice in reversed(trace.choices.values())]
    if not done or not steps:
        for step in steps:
            step()
        return None
    gm.recompile()
    return [*steps, gm.recompile]


# Ops whose output sizes follow the values: past one, the two images' tensors differ in size, no
# stride interleaves them, and the search only ran out its restarts (an ultralytics nms=True export,
# NonZero -> GatherND -> NonMaxSuppression: 294 s to give up).
_VALUE_SIZED_ONNX_OPS = frozenset({"NonZero", "NonMaxSuppression"})


def _sizes_follow_values(gm: fx.GraphModule) -> bool:
    return any(node.meta.get("onnx_op") in _VALUE_SIZED_ONNX_OPS or "nonzero" in str(node.target)
               for node in gm.graph.nodes)


@dataclass(frozen=True)
class _Seen:
    """What the two batch-1 runs computed at a node: its sizes and both images' values at a fixed
    sample of positions (all a check needs; the tensors themselves are not kept)."""

    shape: tuple[int, ...]
    positions: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor


def _sampled(node: fx.Node, value):
    """A tensor's sizes and its values at a fixed sample of positions (the tensor itself is not kept)."""
    if not isinstance(value, torch.Tensor):
        return None
    positions = _sample(value.numel())
    return tuple(value.shape), positions, value.reshape(-1)[positions].clone()


def _seen_alone(gm: fx.GraphModule, one: torch.Tensor, other: torch.Tensor) -> dict[fx.Node, _Seen]:
    first, second = record_nodes(gm, (one,), _sampled), record_nodes(gm, (other,), _sampled)
    return {node: _Seen(shape, positions, values, second[node][2])
            for node, (shape, positions, values) in first.items()
            if node in second and second[node][0] == shape}


class _Trace:
    """The depth-first search of the module docstring over the graph's nodes in order. A failed
    node makes the latest choice take its next option and the run start again (the batch-2 values
    are freed after their last use, as the two batch-1 runs were)."""

    def __init__(self, gm: fx.GraphModule, seen: dict[fx.Node, _Seen], together: torch.Tensor):
        self.gm, self.seen, self.together = gm, seen, together
        self.nodes = list(gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((self.position[u] for u in node.users), default=len(self.nodes))
                         for node in self.nodes}
        self.interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        # node index -> (options, the one taken, its undo, what it depends on), in node order
        self.choices: dict[int, tuple[list, int, Callable[[], None], tuple]] = {}
        self.worked: dict[tuple, object] = {}  # (sizes, stride) -> the option the search last moved to
        self.strides: dict[fx.Node, int | None] = {}  # None: the node's value holds no batch

    def run(self) -> bool:
        env, i, restarts = self.interpreter.env, 0, 0
        while i < len(self.nodes):
            node = self.nodes[i]
            if self._step(node, env):
                for source in node.all_input_nodes:
                    if self.last_use[source] == i:
                        env.pop(source, None)
                i += 1
                continue
            restarts += 1
            if restarts > _MAX_RESTARTS or not self._backtrack():
                return False
            env.clear()
            self.strides.clear()
            i = 0
        return True

    def _step(self, node: fx.Node, env: dict) -> bool:
        """Run ``node`` at batch 2 (choosing its rewrite first where it has one); False if it fails."""
        if node.op == "placeholder":
            env[node] = self.together
            self.strides[node] = self.together[0].numel()
            return True
        if node.op == "output":  # every output batched along its first axis
            outputs: list[fx.Node] = []
            fx.node.map_arg(node.args[0], outputs.append)
            return all(self.strides.get(o) == math.prod(self.seen[o].shape) for o in outputs if o in self.seen)
        if not self._choose(node):
            return False
        stride = self._run(node, env)
        if stride is False and self._repair(node):  # a Concat or Gather that needs the batch spelled out
            stride = self._run(node, env)
        if stride is False:
            return False
        self.strides[node] = stride
        return True

    def _run(self, node: fx.Node, env: dict) -> int | None | bool:
        """Run ``node`` at batch 2: its batch stride (:func:`_batch_stride`), False if it fails."""
        try:
            env[node] = self.interpreter.run_node(node)
        except Exception:
            return False
        return _batch_stride(env[node], self.seen.get(node))

    def _choose(self, node: fx.Node) -> bool:
        """At a reshape to constant sizes of a batched tensor: take its first option (module doc)."""
        index = self.position[node]
        if index in self.choices:
            return True
        source = node.args[0] if node.args else None
        stride = self.strides.get(source) if isinstance(source, fx.Node) else None
        if stride is None or node not in self.seen or _constant_sizes(self.gm, node) is None:
            return True
        shape = self.seen[node].shape
        options = _axes_holding(stride, list(shape))
        if not options:
            return False
        key = (shape, stride)
        if self.worked.get(key) in options:
            options.remove(self.worked[key])
            options.insert(0, self.worked[key])
        self.choices[index] = (options, 0, _rewrite_reshape(self.gm, node, shape, options[0]), key)
        return True

    def _backtrack(self) -> bool:
        """Undo choices back to the latest one with an option left and take that option."""
        while self.choices:
            index = next(reversed(self.choices))
            options, taken, undo, key = self.choices.pop(index)
            undo()
            if taken + 1 < len(options):
                node = self.nodes[index]
                step = _rewrite_reshape(self.gm, node, self.seen[node].shape, options[taken + 1])
                self.choices[index] = (options, taken + 1, step, key)
                self.worked[key] = options[taken + 1]  # the latest evidence for these sizes and stride
                return True
        return False

    def _repair(self, node: fx.Node) -> bool:
        """Rewrite a failing ONNX Concat or Gather whose constant inputs assume batch 1 (once)."""
        if node.op != "call_module" or self.position[node] in self.choices or not all(
                a in self.seen for a in node.all_input_nodes):
            return False
        module = self.gm.get_submodule(str(node.target))
        kind = type(module).__name__
        replacement = (self._repeated_constants(node, module) if kind == "OnnxConcat"
                       else self._gathered_per_image(node, module) if kind == "OnnxGather" else None)
        if replacement is None:
            return False
        self.choices[self.position[node]] = (["repair"], 0, _swap_module(self.gm, str(node.target), replacement), ())
        return True

    def _repeated_constants(self, node: fx.Node, module) -> torch.nn.Module | None:
        """A Concat of batched tensors and batch-free constants (a class token): the constants
        repeated along the batch axis the batched ones share (a size-1 axis at their stride)."""
        inputs = list(node.args)
        constant = tuple(i for i, a in enumerate(inputs) if self.strides.get(a) is None)
        batched = [a for a in inputs if self.strides.get(a) is not None]
        axes = {_pure_batch_axis(self.strides[a], list(self.seen[a].shape)) for a in batched}
        if not constant or not batched or len(axes) != 1 or None in axes:
            return None
        (batch_axis,) = axes
        if batch_axis == module.axis % len(self.seen[batched[0]].shape):
            return None
        return ConcatRepeatingConstants(module.axis, batch_axis, constant)

    def _gathered_per_image(self, node: fx.Node, module) -> torch.nn.Module | None:
        """A Gather on axis 0 with constant indices of a tensor holding the images one after
        another along axis 0 (the dynamo exporter's ``as_strided`` after a flatten): the indices
        taken from every image."""
        data, indices = node.args[0], node.args[1] if len(node.args) > 1 else None
        if not isinstance(indices, fx.Node) or indices.op != "get_attr" or self.strides.get(indices) is not None:
            return None
        shape = self.seen[data].shape
        if module._axis != 0 or not shape or self.strides.get(data) != math.prod(shape) or not self.seen[indices].shape:
            return None
        return GatherEachImage(shape[0])

def _batch_stride(together, seen: _Seen | None) -> int | None | bool:
    """The stride at which ``together`` interleaves the two images' values ``seen`` alone (module
    docstring); None where it holds no batch (a constant: all three equal); False where it is
    neither. Compared at the sampled positions only: the full check is ``batch_consistent``."""
    if seen is None or not isinstance(together, torch.Tensor) or seen.positions.numel() == 0:
        return None
    flat, positions = together.reshape(-1), seen.positions
    if tuple(together.shape) == seen.shape and _close(flat[positions], seen.first) \
            and _close(seen.first, seen.second):
        return None
    if together.numel() != 2 * math.prod(seen.shape):
        return False
    for stride in _candidate_strides(list(seen.shape)):
        # element i of one image sits at row i // stride, column i % stride of (rows, 2, stride)
        at = (positions // stride) * 2 * stride + positions % stride
        if _close(flat[at], seen.first) and _close(flat[at + stride], seen.second):
            return stride
    return False


def _sample(count: int, size: int = 4096) -> torch.Tensor:
    if count <= size:
        return torch.arange(count)
    return torch.randint(count, (size,), generator=torch.Generator().manual_seed(count))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale + 1e-7)


def _candidate_strides(shape: list[int]) -> list[int]:
    """Every stride the batch can sit at in a tensor of ``shape``: a divisor of an axis's size
    times the product of the sizes after it (largest first)."""
    strides = set()
    for k, size in enumerate(shape):
        inner = math.prod(shape[k + 1:])
        strides.update(inner * c for c in _divisors(size))
    return sorted(strides, reverse=True)


def _divisors(n: int) -> set[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return {*small, *(n // d for d in small)}


def _axes_holding(stride: int, shape: list[int]) -> list[int]:
    """The axes of ``shape`` a batch at ``stride`` can multiply: a size-1 axis first, then the batch
    as an axis's outermost part, then the rest (module docstring)."""
    axes = []
    for k, size in enumerate(shape):
        inner = math.prod(shape[k + 1:])
        if stride % inner == 0 and size % (stride // inner) == 0:
            axes.append(k)
    return sorted(axes, key=lambda k: (shape[k] != 1, stride != math.prod(shape[k:]), k))


def _pure_batch_axis(stride: int, shape: list[int]) -> int | None:
    """The size-1 axis a batch at ``stride`` fills alone, if any."""
    for k, size in enumerate(shape):
        if size == 1 and math.prod(shape[k + 1:]) == stride:
            return k
    return None


def _constant_sizes(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    """The constant sizes of a reshape node (ONNX Reshape with an initializer, aten view/reshape
    with integers), else None."""
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))).__name__ == "OnnxReshape":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if isinstance(shape, fx.Node) and shape.op == "get_attr":
            return [int(v) for v in gm.get_buffer(str(shape.target)).tolist()]
        return None
    if node.op == "call_function" and str(node.target) in _SIZED_ATEN and len(node.args) > 1:
        sizes = node.args[1]
        if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
            return list(sizes)
    return None


def _rewrite_reshape(gm: fx.GraphModule, node: fx.Node, shape, axis: int) -> Callable[[], None]:
    """Make ``node`` reshape to ``shape`` (its batch-1 sizes) with ``axis`` inferred; the undo."""
    sizes = [-1 if k == axis else int(s) for k, s in enumerate(shape)]
    if node.op == "call_module":
        return _swap_module(gm, str(node.target), ReshapeToBatched(sizes))
    original = node.args
    node.args = (original[0], sizes, *original[2:])
    return lambda: setattr(node, "args", original)


def _swap_module(gm: fx.GraphModule, target: str, module: torch.nn.Module) -> Callable[[], None]:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    original = getattr(parent, name)
    if hasattr(original, "onnx_mapping"):  # the ONNX names of its inputs and outputs (io_onnx reads them)
        module.onnx_mapping = original.onnx_mapping
    setattr(parent, name, module)
    return lambda: setattr(parent, name, original)
