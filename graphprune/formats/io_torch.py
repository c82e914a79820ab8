"""PyTorch in and out.

* An ``nn.Module`` from Python is traced with ``torch.fx.symbolic_trace`` in eval mode; when
  Python control flow defeats tracing, ``torch.export`` is used instead.
* A ``.pt2`` file is read only through ``torch.export.load`` (no arbitrary unpickling).
* ``torchvision:<name>`` builds a torchvision architecture; ``zoo:<name>`` one of graphprune's own
  (:mod:`graphprune.zoo`). ``weights`` is a state dict read with ``torch.load(weights_only=True)``.

Writing: ``.pt2`` through ``torch.export`` (any batch, else the range the graph allows, else the
example's; other axes the input left dynamic, a program's height and width, stay so); ONNX in
:mod:`graphprune.formats.torch_onnx`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import GraphpruneError, first_line
from ..model import InputSpec, Model
from .batch_axis import batch_consistent, free_view_batches
from .batch_trace import trace_folded_batch

DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
log = logging.getLogger("graphprune")


def load_module(module: nn.Module, input_shape: tuple[int, ...] | None = None, name: str | None = None) -> Model:
    """Trace a Python ``nn.Module`` into a :class:`Model`."""
    if not isinstance(module, nn.Module):
        raise GraphpruneError(f"expected an nn.Module, got {type(module).__name__}")
    if _is_exported(module):  # whose eval() raises NotImplementedError
        return _load_exported(module, name or "program", input_shape)
    shape = tuple(input_shape) if input_shape else tuple(getattr(module, "input_shape", DEFAULT_IMAGE_SHAPE))
    module = copy.deepcopy(module).eval()  # the caller's module keeps its mode and its buffers
    try:
        gm = fx.symbolic_trace(module)
        # symbolic_trace keeps the original module's Python attributes; run once to be sure it works.
        with torch.no_grad():
            gm(torch.randn(shape))
    except Exception:
        gm, fixed_batch = _export_module(module, shape)
    else:
        fixed_batch = False
        if _hides_residual_blocks(gm):  # torch.export traces into them; fx's graph where it cannot
            try:
                gm, fixed_batch = _export_module(module, shape)
            except GraphpruneError:
                pass
    gm.eval()
    spec = InputSpec(_placeholder_names(gm)[0], (None, *shape[1:]))
    model = Model(gm, "torch", (spec,), _output_names(gm), name or type(module).__name__, input_shape=shape)
    _refuse_buffer_updates(model)
    if fixed_batch:
        _free_exported_batch(model)
    return model


# torch.nn modules that fx keeps whole (it traces into no torch.nn module) and whose residual adds
# are the blocks: nn.TransformerEncoder's layers were one node, and no block was found
RESIDUAL_CONTAINERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                       nn.TransformerDecoderLayer)


def _hides_residual_blocks(gm: fx.GraphModule) -> bool:
    return any(node.op == "call_module" and isinstance(gm.get_submodule(node.target), RESIDUAL_CONTAINERS)
               for node in gm.graph.nodes)


def _export_module(module: nn.Module, shape: tuple[int, ...]) -> tuple[fx.GraphModule, bool]:
    """``torch.export`` of a module fx cannot trace (Python control flow, keyword arguments): with
    any batch, else the example's alone; the graph, and whether its batch is fixed."""
    program = _export_any_batch(module, (torch.randn((2, *shape[1:])),))  # 2: export specialises a 1
    if program is not None:
        return plain_graph_module(program.module()), False
    try:
        program = torch.export.export(module, (torch.randn(shape),))
    except Exception as exc:
        raise GraphpruneError(
            f"cannot trace {type(module).__name__} with torch.fx or torch.export: {first_line(exc)[:200]}"
        ) from None
    return plain_graph_module(program.module()), True


def _export_any_batch(module: nn.Module, example: tuple[torch.Tensor, ...],
                      free_axes: tuple[tuple[int, ...], ...] = ()) -> torch.export.ExportedProgram | None:
    """``torch.export`` with the batch axis dynamic: any batch, else the range the graph allows (a
    program read with its own, ``Dim("batch", max=512)``, keeps it); None where neither exports.
    ``free_axes[i]``: input i's other axes that stay dynamic where the graph allows (``Dim.AUTO``)."""
    for batch in (torch.export.Dim("batch", min=1), torch.export.Dim.AUTO):
        try:
            return torch.export.export(module, example, dynamic_shapes=export_dynamic_shapes(example, free_axes, batch))
        except Exception:
            pass
    return None


def export_dynamic_shapes(example, free_axes, batch) -> tuple[dict, ...]:
    """``dynamic_shapes`` for ``torch.export``: each input's batch as ``batch`` (None: static), its
    ``free_axes`` as ``Dim.AUTO``."""
    return tuple({0: batch, **dict.fromkeys(axes, torch.export.Dim.AUTO)}
                 for _, axes in itertools.zip_longest(example, free_axes, fillvalue=()))


def batch_is_dynamic(model: Model) -> bool:
    """Whether every input's batch is dynamic (not one :func:`_free_exported_batch` left at 1)."""
    return all(spec.shape[:1] == (None,) for spec in model.inputs)


def other_dynamic_axes(model: Model) -> tuple[tuple[int, ...], ...]:
    """Each input's dynamic axes besides the batch (a program exported with dynamic H and W)."""
    return tuple(tuple(i for i, d in enumerate(spec.shape) if i and d is None) for spec in model.inputs)


def plain_graph_module(exported: fx.GraphModule) -> fx.GraphModule:
    """An ordinary GraphModule over ``ExportedProgram.module()``'s graph (whose own ``eval()`` and
    ``train()`` raise), sharing its submodules and weights."""
    gm = fx.GraphModule(exported, exported.graph)
    gm.meta.update(getattr(exported, "meta", {}))
    return gm


def _output_names(gm: fx.GraphModule) -> tuple[str, ...]:
    """``output``, or ``output0``, ``output1``, ... for a graph returning several tensors: the ONNX
    file names each (with one name the exporter called the second output '83' and gave it no batch axis)."""
    node = next(n for n in gm.graph.nodes if n.op == "output")
    values = node.args[0]
    count = len(values) if isinstance(values, (tuple, list)) else 1
    return ("output",) if count == 1 else tuple(f"output{i}" for i in range(count))


def _placeholder_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"] or ["input"]


def load_pt2(path: str | os.PathLike, input_shape: tuple[int, ...] | None = None) -> Model:
    """A program saved with ``torch.export.save``."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise GraphpruneError(f"model file not found or empty: {path}")
    export_log = logging.getLogger("torch.export")  # logs a broken archive's traceback as a warning first
    was_disabled, export_log.disabled = export_log.disabled, True
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise GraphpruneError(f"not a readable torch.export program: {path} ({type(exc).__name__})") from None
    finally:
        export_log.disabled = was_disabled
    return load_program(program, path.stem, input_shape)


def load_program(program: torch.export.ExportedProgram, name: str = "program",
                 input_shape: tuple[int, ...] | None = None) -> Model:
    """An ``ExportedProgram`` (read from a ``.pt2``, or made in Python by ``torch.export.export``).
    A dimension exported as dynamic (``dynamic_shapes``) stays dynamic: the batch always; height
    and width where the program allows any (analysed at ``input_shape``, else at its example's
    size, said in one line, and written back dynamic)."""
    return _load_exported(program.module(), name, input_shape)


def _is_exported(module: nn.Module) -> bool:
    """``ExportedProgram.module()``: a graph whose inputs carry the example values export traced."""
    if not isinstance(module, fx.GraphModule):
        return False
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    return bool(placeholders) and all(isinstance(n.meta.get("val"), torch.Tensor) for n in placeholders)


def _load_exported(exported: fx.GraphModule, name: str, input_shape: tuple[int, ...] | None) -> Model:
    """See :func:`load_program`; ``exported`` is its ``module()``."""
    values = {n.target: n.meta["val"] for n in exported.graph.nodes if n.op == "placeholder"}
    specs = tuple(InputSpec(input_name, tuple(None if i == 0 or not isinstance(d, int) else int(d)
                                              for i, d in enumerate(val.shape)),
                            val.dtype, example=(1, *(_size_hint(d) for d in val.shape[1:])))
                  for input_name, val in values.items())
    fixed_batch = bool(values) and isinstance(next(iter(values.values())).shape[0], int)
    gm = plain_graph_module(exported)
    model = Model(gm, "pt2", specs, _output_names(gm), name,
                  input_shape=tuple(input_shape) if input_shape else (specs[0].example if specs else None))
    dynamic = len(specs) == 1 and any(d is None for d in specs[0].shape[1:])
    model.meta["input_shape_source"] = "input_shape" if input_shape else ("example" if dynamic else "declared")
    if dynamic and not input_shape:
        log.warning("input shape %s from the program's example; pass --input-shape to use another",
                    ",".join(map(str, model.input_shape)))
    failure = _refuse_buffer_updates(model)
    if failure is not None and dynamic and input_shape:
        raise GraphpruneError(f"input_shape {','.join(map(str, input_shape))} is not one {name} was exported for: "
                              f"{first_line(failure)[:160]}", parameter="input_shape")
    if fixed_batch:
        _free_exported_batch(model)
    return model


def _size_hint(size: int | torch.SymInt) -> int:
    """A dimension's example size. Not ``int(size)``: that specialises the program's symbol, and
    its module then no longer checks the range it was exported for."""
    return size if isinstance(size, int) else int(size.node.hint or 1)


def _refuse_buffer_updates(model: Model) -> Exception | None:
    """One line for a graph whose forward changes its own buffers (a program exported in training
    mode: BatchNorm updates its running statistics): every run would be another model, and the
    analyses, which must leave the model as they found it, stopped with an internal error. The
    buffers are put back after the trial run; what that run raised is returned."""
    gm = model.graph_module
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad():
            gm(*model.example_inputs(batch_size=1))
    except Exception as exc:
        return exc  # a shape it cannot run (the caller says why; else the first real run does)
    changed = [name for name, b in gm.named_buffers() if not torch.equal(b, saved[name])]
    with torch.no_grad():
        for name, b in gm.named_buffers():
            b.copy_(saved[name])
    if changed:
        raise GraphpruneError(f"{model.name}'s forward updates its buffers ({', '.join(changed[:3])}"
                              f"{', ...' if len(changed) > 3 else ''}): every run would be another model "
                              "(exported in training mode? export it after model.eval())")
    return None


def _free_exported_batch(model: Model) -> None:
    """A program exported without ``dynamic_shapes`` guards its example's batch, but the tiny set
    runs in batches: drop the guard where the graph itself computes every row alone, else where the
    sizes that hold the batch can be found (a leading 1; a product, as attention folds it:
    :mod:`~graphprune.formats.batch_trace`). Where not, the batch stays 1: inspect, drop and
    profile run it image by image, and optimize refuses it (``model.meta["batches_run"]``)."""
    gm = model.graph_module
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    gm.recompile()
    if batch_consistent(model):
        return
    undo = free_view_batches(gm)  # sizes that hold the example's batch (channel shuffle's view)
    if undo and batch_consistent(model):
        return
    undo = (trace_folded_batch(model) or []) + undo  # the batch folded into products (attention)
    if undo and batch_consistent(model):
        return
    for step in undo:
        step()
    model.inputs = tuple(dataclasses.replace(spec, shape=(1, *spec.shape[1:])) for spec in model.inputs)
    model.meta["batches_run"] = False


def build_named(spec: str, weights: str | None = None, input_shape: tuple[int, ...] | None = None) -> Model:
    """``torchvision:resnet50`` or ``zoo:cifar10_resnet56``, optionally with a state dict."""
    family, _, arch = spec.partition(":")
    if family == "torchvision":
        import torchvision

        try:
            module = torchvision.models.get_model(arch, weights=None)
        except Exception:
            known = ", ".join(sorted(torchvision.models.list_models())[:12])
            raise GraphpruneError(f"unknown torchvision model '{arch}' (e.g. {known}, ...)") from None
        shape = DEFAULT_IMAGE_SHAPE
    elif family == "zoo":
        from .. import zoo

        module = zoo.build(arch)
        shape = module.input_shape
    else:
        raise GraphpruneError(f"unknown model source '{spec}': use a file, torchvision:<name> or zoo:<name>")
    if weights:
        load_state_dict_file(module, weights)
    return load_module(module, input_shape or shape, name=arch)


def load_state_dict_file(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict saved by ``torch.save`` without unpickling code (``weights_only=True``).

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}``, with or without the
    ``module.`` prefix DataParallel adds.
    """
    path = Path(path)
    if not path.is_file():
        raise GraphpruneError(f"weights file not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GraphpruneError(f"cannot read weights {path} as a state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GraphpruneError(f"weights file {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise GraphpruneError(f"weights {path} do not fit the architecture: {str(exc).splitlines()[1].strip()[:200]}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise GraphpruneError(
            f"weights {path} do not fit the architecture: {len(missing)} missing, {len(unexpected)} unexpected keys "
            f"(e.g. {(missing + unexpected)[0]})"
        )
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise GraphpruneError(f"weight '{name}' in {path} contains NaN or infinite values")


def export_pt2(model: Model) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of the model (batch axis dynamic where possible)."""
    gm = model.graph_module.eval()
    free_axes = other_dynamic_axes(model)
    program = _export_any_batch(gm, model.example_inputs(batch_size=2), free_axes) if batch_is_dynamic(model) else None
    if program is not None:
        return program
    try:  # the example's batch alone
        example = model.example_inputs()
        return torch.export.export(gm, example, dynamic_shapes=export_dynamic_shapes(example, free_axes, None))
    except Exception as exc:
        hint = " (a model read from ONNX is written back as .onnx)" if model.source == "onnx" else ""
        raise GraphpruneError(f"torch.export failed{hint}: {first_line(exc)[:200]}") from None
