"""Let a graph exported with a fixed batch of 1 run the tiny set in batches.

Exporters that trace with one example (torch's dynamo exporter without ``dynamic_shapes``) write
that example's batch into constant Reshape shapes, typically the flatten before the classifier:
``Reshape(x, [1, 64])``. Scoring, recovery and evaluation feed batches of up to 128 images, which
such a graph refuses. :func:`free_fixed_batch` rewrites, *in the fx graph only*, the leading 1 of
every constant Reshape shape to 0 ("copy the input's dimension"), then checks the invariant it
relies on: a batch of two inputs gives, row for row, what each input gives alone. If that fails
the rewrite is undone (the graph is left as it was exported).

The written ONNX keeps its own constants and its declared batch: the writer copies back only
trained float weights (``onnx_lower``), and these shapes are integer tensors.
"""

from __future__ import annotations

import torch
from torch import fx

from ..model import Model


def free_fixed_batch(model: Model) -> bool:
    """Rewrite ``model``'s constant Reshape shapes so batches run; True if it did (and checks out)."""
    if len(model.inputs) != 1 or model.inputs[0].shape[:1] != (1,):
        return False
    gm = model.graph_module
    rewritten = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)).__name__ != "OnnxReshape":
            continue
        shape_arg = node.args[1] if len(node.args) > 1 else None
        if not isinstance(shape_arg, fx.Node) or shape_arg.op != "get_attr":
            continue
        try:
            shape = gm.get_buffer(shape_arg.target)  # onnx2torch keeps initializers as buffers
        except AttributeError:
            continue
        if shape.dim() == 1 and shape.numel() > 1 and int(shape[0]) == 1:
            rewritten.append((shape, shape.clone()))
            shape[0] = 0
    if not rewritten:
        return False
    if batch_consistent(model):
        return True
    for shape, original in rewritten:
        shape.copy_(original)
    return False


def batch_consistent(model: Model) -> bool:
    """A batch of two inputs gives, row for row, what each input gives alone."""
    (one,) = model.example_inputs(batch_size=1, seed=0)
    (other,) = model.example_inputs(batch_size=1, seed=1)
    try:
        together = model.run(torch.cat([one, other]))
        apart = torch.cat([model.run(one), model.run(other)])
    except Exception:
        return False
    return together.shape == apart.shape and torch.allclose(together, apart, rtol=1e-4, atol=1e-4)
