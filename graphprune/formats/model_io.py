"""``load`` and ``save``: every model format in, the right format out, verified, written atomically.

Saving ONNX: lower (ONNX input) or export (PyTorch input), simplify with onnxsim, check with
``onnx.checker``, and compare onnxruntime against the fx graph on random inputs before a byte is
written. Every file is written to a temporary name in the destination folder and renamed into
place, so a failure (or Ctrl-C) never leaves a partial file, and an existing file is replaced only
by a verified one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from ..errors import GraphpruneError
from ..interrupts import raise_if_interrupted
from ..model import Model
from . import io_onnx, io_torch, torch_onnx
from .batch_axis import note_batch_axes
from .onnx_lower import lower
from .onnx_opset import restore_opset
from .onnx_read import check_onnx, simplify

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".th", ".bin", ".ckpt")


def load(source, input_shape: tuple[int, ...] | None = None, weights: str | None = None) -> Model:
    """Load a model: an ``nn.Module`` or ``ExportedProgram``, an ``.onnx`` or ``.pt2`` file,
    ``torchvision:<arch>`` or ``zoo:<arch>`` (with an optional state-dict ``weights`` file)."""
    if isinstance(source, Model):
        return source
    model = _load(source, input_shape, weights)
    note_batch_axes(model)  # sequence-first activations, cached batch first (features.truncate)
    return model


def _load(source, input_shape: tuple[int, ...] | None, weights: str | None) -> Model:
    if isinstance(source, torch.export.ExportedProgram):
        return io_torch.load_program(source, "program", input_shape)
    if isinstance(source, nn.Module):
        return io_torch.load_module(source, input_shape)
    text = str(source)
    if text.startswith(("torchvision:", "zoo:")):
        return io_torch.build_named(text, weights, input_shape)
    if weights is not None:  # a file holds its own weights: ignoring these silently would mislead
        raise GraphpruneError(f"weights are for torchvision:/zoo: architectures; {text} holds its own",
                              parameter="weights")
    suffix = Path(text).suffix.lower()
    if suffix == ".onnx":
        return io_onnx.load_onnx(text, input_shape)
    if suffix == ".pt2":
        return io_torch.load_pt2(text, input_shape)
    if suffix in PICKLE_SUFFIXES and _is_torchscript(text):
        raise GraphpruneError(
            f"{text}: a TorchScript archive (torch.jit.save), which graphprune does not read; export the "
            "module with torch.export.save (.pt2) or to .onnx"
        )
    if suffix in PICKLE_SUFFIXES:
        raise GraphpruneError(
            f"{text}: pickled PyTorch files are never unpickled; export a .pt2 with torch.export.save, "
            "or pass an architecture (torchvision:<name>, zoo:<name>) with --weights STATE_DICT"
        )
    if not Path(text).exists():
        raise GraphpruneError(f"model file not found: {text}")
    raise GraphpruneError(f"unknown model format '{suffix or text}': expected .onnx or .pt2")


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (a zip holding the module's code), which the pickle refusal misnamed:
    the user who saved one did not pickle a module, and asked what graphprune reads."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name and name.endswith(".py") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def to_onnx(model: Model, verify: bool = True) -> onnx.ModelProto:
    """The model as a checked, simplified ONNX graph (verified against the fx graph)."""
    if model.source == "onnx":
        proto = restore_opset(lower(model), model.onnx.input_opset or 0)
    else:
        try:
            proto = onnx.load_model_from_string(torch_onnx.export_onnx(model))
        except GraphpruneError:
            raise
        except Exception as exc:
            raise GraphpruneError(f"ONNX export produced an unreadable model ({type(exc).__name__})") from None
    proto = simplify(proto)
    check_onnx(proto, "(output)")
    if verify:
        try:
            io_onnx.verify_against_onnxruntime(proto, model, what="the written model", atol=1e-3)
        except GraphpruneError as exc:
            if any(p.dtype == torch.float64 for p in model.graph_module.parameters()):  # no double Conv there
                raise GraphpruneError(f"{exc} (the weights are float64: write a .pt2, or export it after "
                                      "model.float())") from None
            raise
    return proto


def save(model: Model, path: str | os.PathLike, source_path: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``path`` (``.onnx`` or ``.pt2``), verified and atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".pt2"):
        raise GraphpruneError(f"output must end in .onnx or .pt2, got '{path.name}'")
    if not path.parent.exists() or not path.parent.is_dir():
        raise GraphpruneError(f"output folder does not exist: {path.parent}")
    for src in (source_path, model.onnx.path if model.onnx is not None else None):
        if src is not None and Path(src).exists() and path.exists() and path.resolve() == Path(src).resolve():
            raise GraphpruneError(f"refusing to overwrite the input model {path}; choose another output path")
    if suffix == ".onnx":
        proto = to_onnx(model)
        if model.source != "onnx":
            _carry_block_names(model, proto)
        else:
            _keep_block_names(model, proto)
        data = proto.SerializeToString()
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    else:
        program = io_torch.export_pt2(model)
        atomic_write(path, lambda tmp: torch.export.save(program, str(tmp)))
    return path


def _carry_block_names(model: Model, proto: onnx.ModelProto) -> None:
    """Exporting an fx graph loses module paths from ONNX node names; when the exported graph has
    the same blocks (count and kinds, in order) record the PyTorch names in its metadata."""
    from ..passes.find_blocks import find_blocks

    exported = io_onnx.load_proto(proto, model.input_shape)
    ours, theirs = find_blocks(model), find_blocks(exported)
    if [b.kind for b in ours] != [b.kind for b in theirs]:
        return
    merge_names = {n.name: n.meta.get("onnx_name") for n in exported.graph_module.graph.nodes}
    io_onnx.record_block_names(proto, [(merge_names[t.merge], o.name) for o, t in zip(ours, theirs)])


def _keep_block_names(model: Model, proto: onnx.ModelProto) -> None:
    """A lowered graph keeps its node names, so the names ``drop_blocks`` kept on the merges
    (``meta["block_name"]``) are recorded against them: the file reads back with those names."""
    written = {n.name for n in proto.graph.node}
    kept = [(n.meta["onnx_name"], n.meta["block_name"]) for n in model.graph_module.graph.nodes
            if "block_name" in n.meta and n.meta.get("onnx_name") in written]
    if kept:
        io_onnx.record_block_names(proto, kept)


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_stages: list[list[tuple[Path, Path]]] = []  # open staged_writes blocks: (temporary, final) pairs


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place (inside
    :func:`staged_writes`: when the block ends). A folder that cannot take the file is one line."""
    path = Path(path)
    tmp = _temporary_next_to(path)
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode any other would
        except OSError as exc:  # a full disk, a name too long for the file system
            raise GraphpruneError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise_if_interrupted()  # a Ctrl-C swallowed while writing must not leave the file behind
        if _stages:
            _stages[-1].append((tmp, path))
            return
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> None:
    """One line now, not after the run, where ``path`` cannot be written as :func:`atomic_write`
    writes it (no folder, no rights, a name too long with the temporary name's additions)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise GraphpruneError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise GraphpruneError(f"output is a folder: {path}")
    _temporary_next_to(path).unlink()


def _temporary_next_to(path: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=str(path.parent))
    except OSError as exc:
        raise GraphpruneError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(name)


@contextmanager
def staged_writes():
    """Every :func:`atomic_write` inside the block stays under its temporary name until the block
    ends, then all are renamed into place; if the block fails, none is: a command writing a model,
    a report and a plot leaves all three or nothing."""
    stage: list[tuple[Path, Path]] = []
    _stages.append(stage)
    try:
        yield
        raise_if_interrupted()
    except BaseException:
        for tmp, _ in stage:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _stages.remove(stage)
    try:
        for index, (tmp, path) in enumerate(stage):
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in stage[index:]:
            tmp.unlink(missing_ok=True)
        raise GraphpruneError(f"cannot write {path}: {exc.strerror or exc}") from None
