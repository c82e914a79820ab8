"""Let a graph exported with a fixed batch of 1 run the tiny set in batches.

Exporters that trace with one example (torch's dynamo exporter without ``dynamic_shapes``, the
TorchScript exporter without ``dynamic_axes``) write that example's batch into constants:

* Reshape shapes, typically the flatten before the classifier: ``Reshape(x, [1, 64])``;
* Resize sizes, where a segmentation head upsamples to the input's size: ``Resize(x, sizes=[1, C, H, W])``
  (constant once shape arithmetic is folded; onnx2torch refuses any batch but that one).

Scoring, recovery and evaluation feed batches of up to 128 images, which such a graph refuses.
:func:`free_fixed_batch` rewrites, *in the fx graph only*, the leading 1 of every constant Reshape
shape to 0 ("copy the input's dimension") and lets every Resize with constant sizes that start
with 1 resize only its spatial axes (which is all a Resize with such sizes does), then checks the
invariant it relies on: a batch of two inputs gives, row for row, what each input gives alone. If
that fails, :func:`~graphprune.formats.batch_trace.trace_folded_batch` looks for a batch folded
into products of sizes (attention's ``[L, N*heads, E/heads]``) under the same check; if that fails
too, every rewrite is undone (the graph is left as it was exported) and
``model.meta["batches_run"]`` is False: ``optimize`` refuses such a model in one line.
A batch axis the file declares dynamic gets the same check (:func:`_check_declared_batch`):
ultralytics' ``nms=True`` export (``dynamic=True``) declares one, yet every image but the first of a
batch comes out with no detections.

The written ONNX keeps its own constants and its declared batch: the writer copies back only
trained float weights (``onnx_lower``), and these shapes are integer tensors.

A ``torch.export`` program saved without ``dynamic_shapes`` holds its example's batch the same
way, as the leading 1 of ``view``/``reshape``/``expand`` sizes (ShuffleNet's channel shuffle,
``x.view(1, groups, c, h, w)``). :func:`free_view_batches` makes each such leading 1, on a tensor
whose batch is 1, the input's batch (``sym_size(input, 0)``), under the same check and undo.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import fx

from ..errors import GraphpruneError
from ..graph_stats import record_nodes
from ..model import Model
from .batch_trace import trace_folded_batch

BATCH_AXIS = "batch_axis"  # node meta: the axis of a sequence-first activation's batch (note_batch_axes)


def free_fixed_batch(model: Model) -> bool:
    """Rewrite ``model``'s constants so batches run; True if it did (and checks out). Sets
    ``model.meta["batches_run"]`` where the input's batch is fixed at 1."""
    if len(model.inputs) != 1:
        return False
    if model.inputs[0].shape[:1] == (None,):
        _check_declared_batch(model)
        return False
    if model.inputs[0].shape[:1] != (1,):
        return False
    gm = model.graph_module
    undo = _free_reshapes(gm) + _free_resizes(gm)
    if undo and batch_consistent(model):
        model.meta["batches_run"] = True
        return True
    for step in undo:
        step()
    if batch_consistent(model):
        model.meta["batches_run"] = True
        return False
    undo = _free_resizes(gm) + (trace_folded_batch(model) or [])  # the batch folded into products
    model.meta["batches_run"] = bool(undo) and batch_consistent(model)
    if model.meta["batches_run"]:
        return True
    for step in undo:
        step()
    _note_sequence_first(model)
    return False


def _note_sequence_first(model: Model) -> None:
    """Where a fixed batch of 1 runs batches but the output holds them on axis 1 ((T, N, C): the
    sequence-first layout of a CTC recogniser, as PyTorch's CTC loss takes it),
    ``model.meta["batch_on_axis_1"]``, so the refusal says that, not that the graph fixes its batch
    (a file that declares its batch dynamic is read so: :func:`_check_declared_batch`)."""
    if batch_consistent(model, axis=1):
        model.meta["batch_on_axis_1"] = True


def _check_declared_batch(model: Model) -> None:
    """A batch axis the file declares dynamic is taken at its word only where a batch of two gives
    what each image gives alone: ultralytics' ``nms=True`` export declares one and keeps the first
    image's detections only (the rest all 0), which would score and evaluate one image per batch.
    Where it does not, ``model.meta["batches_run"]`` is False (``optimize`` refuses the model in one
    line, ``meta["declared_batch"]`` saying why)."""
    try:
        model.example_inputs(batch_size=1)
    except GraphpruneError:
        return  # dynamic spatial sizes and no shape: nothing to run yet
    if batch_consistent(model) or batch_consistent(model, axis=1):  # (T, N, C): read batch first
        return  # (note_batch_axes notes the axis, which every reader of the outputs moves to 0)
    model.meta["batches_run"] = False
    model.meta["declared_batch"] = True


def _constant_arg(gm: fx.GraphModule, node: fx.Node, index: int, keyword: str) -> torch.Tensor | None:
    """The buffer behind argument ``index`` (or ``keyword``) of ``node`` where it is a constant."""
    arg = node.args[index] if len(node.args) > index else node.kwargs.get(keyword)
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    try:
        return gm.get_buffer(arg.target)  # onnx2torch keeps initializers as buffers
    except AttributeError:
        return None


def _modules_of_type(gm: fx.GraphModule, type_name: str):
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == type_name:
            yield node, gm.get_submodule(node.target)


def _leads_with_one(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.dim() == 1 and tensor.numel() > 1 and int(tensor[0]) == 1


def _free_reshapes(gm: fx.GraphModule) -> list[Callable[[], None]]:
    undo = []
    for node, _ in _modules_of_type(gm, "OnnxReshape"):
        shape = _constant_arg(gm, node, 1, "shape")
        if _leads_with_one(shape):
            undo.append(lambda shape=shape, original=shape.clone(): shape.copy_(original))
            shape[0] = 0
    return undo


def _free_resizes(gm: fx.GraphModule) -> list[Callable[[], None]]:
    undo = []
    for node, module in _modules_of_type(gm, "OnnxResize"):
        if _leads_with_one(_constant_arg(gm, node, 3, "sizes")) and not module.ignore_bs_ch_size:
            undo.append(lambda module=module: setattr(module, "ignore_bs_ch_size", False))
            module.ignore_bs_ch_size = True
    return undo


def note_batch_axes(model: Model) -> None:
    """``node.meta[BATCH_AXIS]`` for every node whose output holds the batch on an axis other than
    0 (sequence-first activations: CLIP's and DETR's ``(L, N, D)`` tokens, an LSTM's ``(T, N, H)``):
    the one axis whose size is 1 for one image and 2 for two. Everything graphprune caches from
    inside a network is read batch first (:func:`graphprune.features.truncate` moves such an axis
    to 0, :func:`~graphprune.features.suffix_from` moves it back), so such a value is cached, sliced
    and sampled image by image like any other. Nothing is noted where batches do not run."""
    if model.meta.get("batches_run") is False or len(model.inputs) != 1:
        return
    gm = model.graph_module
    try:
        one, other = model.example_inputs(batch_size=1, seed=0), model.example_inputs(batch_size=1, seed=1)
        shapes = [record_nodes(gm, inputs, _tensor_shape)
                  for inputs in (one, tuple(torch.cat([a, b]) for a, b in zip(one, other)))]
    except Exception:  # a model that does not run here: its own error comes where it is run
        return
    for node in gm.graph.nodes:
        single, double = shapes[0].get(node), shapes[1].get(node)
        if single is None or double is None or len(single) != len(double):
            continue
        changed = [i for i, (a, b) in enumerate(zip(single, double)) if a != b]
        if len(changed) == 1 and changed[0] != 0 and (single[changed[0]], double[changed[0]]) == (1, 2):
            node.meta[BATCH_AXIS] = changed[0]


def _tensor_shape(node: fx.Node, value) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def output_batch_axes(model: Model) -> tuple[int, ...]:
    """Per output tensor of ``model`` (in the order its graph returns them), the axis of its batch
    (:func:`note_batch_axes`; 0 where none is noted)."""
    leaves: list = []
    fx.node.map_arg(model.graph_module.graph.output_node().args[0], leaves.append)
    return tuple(int(leaf.meta.get(BATCH_AXIS, 0)) for leaf in leaves)


def batch_first(outputs, axes: tuple[int, ...]) -> tuple:
    """``outputs`` (tensors or arrays, one per output) with each one's batch axis (``axes``) moved to 0."""
    if not any(axes) or len(axes) != len(outputs):
        return tuple(outputs)
    return tuple(_move_to_front(out, axis) for out, axis in zip(outputs, axes))


def _move_to_front(value, axis: int):
    if not axis:
        return value
    return value.movedim(axis, 0) if isinstance(value, torch.Tensor) else np.moveaxis(value, axis, 0)


def batch_consistent(model: Model, axis: int = 0) -> bool:
    """A batch of two inputs gives, row for row, what each input gives alone (every input batched),
    the output's rows along ``axis``."""
    one, other = model.example_inputs(batch_size=1, seed=0), model.example_inputs(batch_size=1, seed=1)
    try:
        together = model.run(*(torch.cat([a, b]) for a, b in zip(one, other)))
        apart = torch.cat([model.run(*one), model.run(*other)], axis)
    except Exception:
        return False
    if together.shape != apart.shape:
        return False
    # A batch's sums are ordered unlike a row's: float32 differs by ~1e-7 of the output's scale, so
    # the tolerance is relative to that scale (batch_trace does the same). An elementwise 1e-4 read
    # an untrained network whose logits reach 1e12 (timm's mobileone_s0) as fixing its batch.
    scale = float(apart.abs().max()) if apart.numel() else 0.0
    return torch.allclose(together, apart, rtol=1e-4, atol=1e-4 * max(1.0, scale))


# the aten ops that take a list of sizes, and the tensor method each one is
SIZED_OPS = {"aten.view.default": "view", "aten._unsafe_view.default": "view",
             "aten.reshape.default": "reshape", "aten.expand.default": "expand"}


def free_view_batches(gm: fx.GraphModule) -> list[Callable[[], None]]:
    """Each ``view``/``reshape``/``expand`` of a batch-1 tensor to sizes that lead with 1 reads its
    leading size from the input instead (module docstring); the steps that undo it."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sized = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in SIZED_OPS
             and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) > 1 and n.args[1][0] == 1
             and getattr(n.args[0].meta.get("val"), "shape", (None,))[:1] == (1,)]
    if len(inputs) != 1 or not sized:
        return []
    with gm.graph.inserting_after(inputs[0]):
        batch = gm.graph.call_function(torch.ops.aten.sym_size.int, (inputs[0], 0))
    undo = []
    for node in sized:
        original = node.args
        node.args = (original[0], [batch, *original[1][1:]], *original[2:])
        undo.append(lambda node=node, original=original: setattr(node, "args", original))
    undo.append(lambda: gm.graph.erase_node(batch))  # last: the nodes read it until they are undone
    gm.recompile()
    return [*undo, gm.recompile]
