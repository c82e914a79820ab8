"""The :class:`Model` every pass consumes and produces.

A model is a ``torch.fx.GraphModule`` plus what is needed to write it back out in the format it came
in: the input specification, and for ONNX inputs the original ``ModelProto`` with a one-to-one map
from fx nodes to ONNX nodes (see :mod:`graphprune.formats.io_onnx`). Passes never mutate a model in place:
transforms work on :meth:`Model.clone` and return the clone.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .errors import GraphpruneError


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, shape (``None`` for a dynamic dimension) and dtype; ``example``:
    the full shape a program was exported at, which its dynamic dimensions take when no shape is
    given (a ``.pt2`` records one; an ONNX file does not)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype = torch.float32
    example: tuple[int, ...] | None = None

    def concrete_shape(self, override: tuple[int, ...] | None = None, batch_size: int = 1) -> tuple[int, ...]:
        """The shape to run with: ``override`` if given, else this shape with batch ``batch_size``."""
        if override is not None:
            if len(override) != len(self.shape):
                raise GraphpruneError(
                    f"input_shape {','.join(map(str, override))} has {len(override)} dimensions; "
                    f"input '{self.name}' has {len(self.shape)}", parameter="input_shape"
                )
            clash = next((i for i, (fixed, given) in enumerate(zip(self.shape, override))
                          if i and fixed is not None and fixed != given), None)
            if clash is not None:  # onnxruntime refused it later in a message cut short
                raise GraphpruneError(
                    f"input_shape {','.join(map(str, override))} does not fit input '{self.name}' "
                    f"{_fmt_shape(self.shape)}: its dimension {clash} is fixed at {self.shape[clash]}",
                    parameter="input_shape")
            return _checked_size(self.name, tuple(override))
        dims = list(self.shape)
        if dims and dims[0] is None:
            dims[0] = batch_size
        if self.example is not None:
            dims = [e if d is None else d for d, e in zip(dims, self.example)]
        if any(d is None for d in dims):
            raise GraphpruneError(
                f"input '{self.name}' has dynamic dimensions {_fmt_shape(self.shape)}; "
                "pass input_shape, e.g. input_shape 1,3,224,224", parameter="input_shape"
            )
        return _checked_size(self.name, tuple(int(d) for d in dims))


HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32 by graphprune (io_onnx)
MAX_INPUT_ELEMENTS = 2**28  # 1 GiB of float32: far above any image batch graphprune runs


def _checked_size(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Refuse shapes a file can declare but no machine can allocate (a hostile 1x3x100000x100000)."""
    elements = 1
    for d in shape:
        if d < 0:
            raise GraphpruneError(f"input '{name}' has a negative dimension: {_fmt_shape(shape)}")
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise GraphpruneError(f"input '{name}' of shape {_fmt_shape(shape)} has {elements:,} elements; "
                              f"graphprune handles at most {MAX_INPUT_ELEMENTS:,} (pass a smaller input_shape)",
                              parameter="input_shape")
    return shape


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


@dataclass
class Model:
    """A traced network: the fx graph to analyse and transform, and how to write it back.

    ``source`` is ``"onnx"``, ``"pt2"`` or ``"torch"``. ``onnx`` holds an
    :class:`graphprune.formats.io_onnx.OnnxOrigin` for ONNX inputs. ``input_shape`` is the concrete shape
    used for analysis (shapes, MACs, latency) when the user fixes one.
    """

    graph_module: fx.GraphModule
    source: str
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...] = ()
    name: str = "model"
    onnx: Any = None
    input_shape: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def clone(self) -> "Model":
        """A deep copy of the graph and its weights; the ONNX origin (read-only) is shared."""
        gm = self.graph_module
        new_gm = fx.GraphModule(copy.deepcopy(_root_of(gm)), copy.deepcopy(gm.graph))
        new_gm.train(gm.training)
        for node_new, node_old in zip(new_gm.graph.nodes, gm.graph.nodes):
            node_new.meta = dict(node_old.meta)
        return dataclasses.replace(self, graph_module=new_gm, meta=dict(self.meta))

    def with_graph_module(self, graph_module: fx.GraphModule) -> "Model":
        return dataclasses.replace(self, graph_module=graph_module, meta=dict(self.meta))

    def example_inputs(self, batch_size: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the analysis shape (normal for floats, zeros for integers)."""
        return example_inputs(self.inputs, self.input_shape, batch_size, seed)

    def analysis_shape(self) -> tuple[int, ...]:
        """The single input's concrete shape (batch 1 unless the user fixed one)."""
        return self.example_inputs()[0].shape

    @torch.no_grad()
    def run(self, *inputs: torch.Tensor):
        """Run the graph in eval mode and return its (first) output tensor."""
        gm = self.graph_module
        was_training = gm.training
        gm.eval()
        try:
            out = gm(*inputs)
        finally:
            gm.train(was_training)
        return first_tensor(out)


def example_inputs(specs: tuple[InputSpec, ...], input_shape: tuple[int, ...] | None = None, batch_size: int = 1,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``specs`` (``input_shape``: the one input's shape where it is dynamic),
    normal for floats and zeros for integers; a dynamic batch axis takes ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = list(spec.concrete_shape(input_shape if len(specs) == 1 else None, batch_size))
        if spec.shape and spec.shape[0] is None:  # a dynamic batch axis takes the batch asked for
            shape[0] = batch_size
        if spec.dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen, dtype=spec.dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=spec.dtype))
    return tuple(tensors)


def first_tensor(out):
    """The first tensor in a (possibly nested) model output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for item in out:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(out, dict):
        for item in out.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _root_of(gm: fx.GraphModule) -> torch.nn.Module:
    """A plain module holding gm's submodules, parameters and buffers (for copying)."""
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, param in gm.named_parameters(recurse=False):
        root.register_parameter(name, param)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    # get_attr targets that are plain tensor attributes (not registered) must survive too.
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
            setattr(root, node.target, getattr(gm, node.target))
    return root
