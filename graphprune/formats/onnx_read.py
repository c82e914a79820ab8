"""Reading ONNX files safely, and bringing them to the form the converter needs.

* :func:`read_onnx`: size limits; external data only from inside the model's own folder.
* :func:`check_onnx`: ``onnx.checker``, opset >= 9, finite weights, each as a one-line error.
* :func:`normalise`: initializer-backed graph inputs removed, Constant nodes turned into
  initializers, constant subgraphs (``ConstantOfShape`` weights) folded into initializers
  (:mod:`graphprune.formats.onnx_fold`), onnxsim constant folding (without fusions, so node
  names keep their module paths; the exporter's node metadata is copied back), an ``If`` with a constant
  condition replaced by its branch (:mod:`graphprune.formats.onnx_if`), shared float weights untied, an inert
  Reshape ``allowzero`` dropped, and every op checked against onnx2torch's converters (ops and
  opsets they do not cover are converted: :mod:`graphprune.formats.onnx_opset`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import GraphpruneError, first_line, shown
from ..steplog import timed_step
from .onnx_fold import fold_constants
from .onnx_if import inline_constant_ifs
from .onnx_opset import default_opset, expand_functions, to_converter_opset

MAX_MODEL_BYTES = 4 * 2**30  # refuse anything larger (protobuf + external data)
MIN_OPSET = 9


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file safely: size limits, and external data only from the model's folder."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"model file not found: {path}")
    if path.is_dir():
        raise GraphpruneError(f"model path is a folder, not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise GraphpruneError(f"model file is empty: {path}")
    if size > MAX_MODEL_BYTES:
        raise GraphpruneError(f"model file is larger than {MAX_MODEL_BYTES >> 30} GiB: {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish or ValueError
        raise GraphpruneError(f"not a readable ONNX file: {path} ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise GraphpruneError(f"not an ONNX model (no graph nodes): {path}")
    _load_external_data(proto, path.parent)
    return proto


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    external = [t for t in _all_initializers(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    base = base_dir.resolve()
    total = 0
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise GraphpruneError(
                f"external data '{location}' of tensor '{tensor.name}' is outside the model's folder"
            )
        if not target.is_file():
            raise GraphpruneError(f"external data file not found: {location}")
        length = info.get("length", str(target.stat().st_size))
        if not length.isdigit():
            raise GraphpruneError(f"external data of tensor '{tensor.name}' has a length that is not a size: "
                                  f"'{shown(length)}'")
        total += int(length)
        if total > MAX_MODEL_BYTES:
            raise GraphpruneError(f"external data is larger than {MAX_MODEL_BYTES >> 30} GiB")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise GraphpruneError(f"could not read the model's external data ({exc})") from None


def _all_initializers(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def check_onnx(proto: onnx.ModelProto, label: str) -> None:
    """Opset range, structural validity, an eval-mode export and finite weights, each as a one-line
    error (the opset first: the checker reads an opset newer than the installed onnx's as a wrong
    attribute)."""
    opset, newest = default_opset(proto), onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise GraphpruneError(f"ONNX opset {opset} is not supported (need {MIN_OPSET} to {newest}, the newest the "
                              f"installed onnx knows): {label}")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise GraphpruneError(f"invalid ONNX model {label}: {first_line(exc)}") from None
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        sizes = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if value.name not in initializers and any(size < -1 for size in sizes):  # -1: Paddle2ONNX's dynamic size
            raise GraphpruneError(f"input '{value.name}' of {label} declares a negative size: {sizes}")
    training = next((n for n in proto.graph.node
                     if n.op_type == "BatchNormalization" and len([o for o in n.output if o]) > 1), None)
    if training is not None:  # onnx2torch's "BatchNorm operation with mean/var output is not implemented"
        raise GraphpruneError(f"{label} was exported in training mode (BatchNormalization '{training.name}' "
                              "outputs its running statistics): export it after model.eval()")
    for tensor in _all_initializers(proto):
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            values = numpy_helper.to_array(tensor)
            if values.size and not np.isfinite(values).all():
                raise GraphpruneError(f"weight '{tensor.name}' contains NaN or infinite values: {label}")


def simplify(proto: onnx.ModelProto, fuse: bool = True) -> onnx.ModelProto:
    """onnxsim: constant folding and, with ``fuse``, its graph fusions (which rename the nodes
    they create, so inputs are read with ``fuse=False`` to keep the exporter's module paths).
    The input is returned unchanged if onnxsim cannot help, or where onnxruntime does not run what
    it made as it runs the input: PP-OCRv4's recogniser with its width fixed at 320 has 40
    positions, onnx's shape inference makes 39 of them, and onnxsim wrote a Concat that onnxruntime
    refused and, fusing, a Reshape to 39 that fails at run time."""
    try:
        import onnxsim
    except ImportError:  # onnxsim is a dependency; tolerate its absence on bare GPU images
        return proto
    try:
        with quiet_native_output():  # onnxsim prints warnings from C++ straight to stdout
            simplified, ok = onnxsim.simplify(copy.deepcopy(proto), perform_optimization=fuse)
    except Exception:
        return proto
    if not ok or not _computes_alike(simplified, proto):
        return proto
    _restore_node_metadata(simplified, proto)
    for prop in [p for p in simplified.metadata_props if p.key.startswith("onnxsim.")]:
        simplified.metadata_props.remove(prop)  # its own bookkeeping would end up in written files
    return simplified


def _computes_alike(simplified: onnx.ModelProto, proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs ``simplified`` as it runs ``proto``: the same outputs on one random
    input where every input dimension but the first is fixed (the first taken as 1), else whether
    it makes a session of it. True where onnxruntime cannot run ``proto`` itself (nothing to compare)."""
    import onnxruntime as ort

    def outputs(model: onnx.ModelProto, feeds: dict | None):
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failing run is an answer here, not an error to print
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds) if feeds is not None else []

    feeds = _random_feeds(proto)
    try:
        expected = outputs(proto, feeds)
    except Exception:  # onnxruntime cannot run the input (custom ops, over 2 GiB): nothing to compare
        return True
    try:
        got = outputs(simplified, feeds)
    except Exception:
        return False
    return all(a.shape == b.shape
               and np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(b).max(initial=0))))
               for a, b in zip(got, expected))


CHECK_ELEMENTS = 2**24  # an input larger than a 2048 x 2048 x 4 image is not run to check a simplification


def _random_feeds(proto: onnx.ModelProto) -> dict | None:
    """One random value per graph input, or None where a dimension past the first is not fixed or
    an input has more than CHECK_ELEMENTS elements."""
    initializers = {t.name for t in proto.graph.initializer}
    rng, feeds = np.random.default_rng(0), {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.dim_value for d in dims[1:]):
            return None
        shape = [d.dim_value or 1 for d in dims]
        if np.prod(shape, dtype=np.float64) > CHECK_ELEMENTS:
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                             else np.zeros(shape, dtype))
    return feeds


def _restore_node_metadata(simplified: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnxsim drops every node's ``metadata_props``, where the dynamo exporter keeps each node's
    module path; nodes keep their names, so the metadata is copied back by name."""
    by_name = {n.name: n.metadata_props for n in original.graph.node if n.name and len(n.metadata_props)}
    for node in simplified.graph.node:
        if not len(node.metadata_props) and node.name in by_name:
            node.metadata_props.extend(by_name[node.name])


@contextlib.contextmanager
def quiet_native_output():
    """Silence stdout/stderr at the file-descriptor level (native libraries bypass sys.stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Constant nodes become initializers (onnx2torch reads conv weights only from initializers)."""
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and not node.domain and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                value = np.array(attr.f if attr.name == "value_float" else attr.i,
                                 dtype=np.float32 if attr.name == "value_float" else np.int64)
            elif attr.name in ("value_floats", "value_ints"):
                value = np.array(list(attr.floats) if attr.name == "value_floats" else list(attr.ints),
                                 dtype=np.float32 if attr.name == "value_floats" else np.int64)
            if value is not None:
                proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _untie_initializers(proto: onnx.ModelProto) -> None:
    """Give every node its own copy of a float weight that several nodes read.

    Exporters deduplicate identical initializers (zero biases, tied weights); recovery trains each
    use separately, so each use needs its own tensor to be written back to."""
    by_name = {t.name: t for t in proto.graph.initializer}
    seen: set[str] = set()
    for node in proto.graph.node:
        for slot, name in enumerate(node.input):
            tensor = by_name.get(name)
            if tensor is None or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                          onnx.TensorProto.DOUBLE):
                continue
            if name not in seen:
                seen.add(name)
                continue
            if int(np.prod(tensor.dims)) <= 1:
                continue  # scalars (epsilons, exponents) are constants, never trained
            copy_name = f"{name}__use{len(seen)}"
            seen.add(copy_name)
            duplicate = proto.graph.initializer.add()
            duplicate.CopyFrom(tensor)
            duplicate.name = copy_name
            node.input[slot] = copy_name


def _drop_inert_allowzero(proto: onnx.ModelProto) -> None:
    """Reshape's ``allowzero=1`` (the dynamo exporter sets it) only changes what a 0 in the shape
    means; onnx2torch refuses it, so it is dropped where the shape is a constant without zeros."""
    constants = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Reshape" or node.domain or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if 0 in numpy_helper.to_array(constants[node.input[1]]).reshape(-1):
            continue
        keep = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend(keep)


def _strip_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Initializers listed as graph inputs (old exporters) are weights, not inputs. Before IR 4 a
    file had to list them, so the file is raised to IR 4, or onnx's checker (and so onnxsim, which
    then folds nothing) refuses the result."""
    names = {t.name for t in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.ir_version = max(proto.ir_version, 4)


def _name_minus_one_sizes(proto: onnx.ModelProto) -> None:
    """A size written as -1 (Paddle2ONNX's dynamic size: PaddleOCR's direction classifier takes
    x [-1, 3, ?, ?]) becomes a named dynamic size, as every other exporter writes one."""
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value == -1:
                dim.dim_param = f"{value.name}_dynamic_{axis}"


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types (with their opset) that onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    from .onnx_converters import register

    register()  # graphprune's own converters (GridSample) count as converters
    versions = {e.domain or "": e.version for e in proto.opset_import}
    missing = set()
    for node in proto.graph.node:
        version = versions.get(node.domain or "", versions.get("", 0))
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            missing.add(f"{(node.domain + '.') if node.domain else ''}{node.op_type}-{version}")
    return sorted(missing)


def normalise(proto: onnx.ModelProto, label: str,
              timings: dict[str, float] | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A converter-ready copy of ``proto`` (see the module docstring), and the same graph before
    its opset was changed for the converter (the same object when it was not). Each rewrite is a
    named, timed step (``--verbose`` logs it; its seconds go into ``timings``)."""
    proto = copy.deepcopy(proto)
    for name, rewrite in REWRITES:
        with timed_step(f"load:{name}", timings):
            result = rewrite(proto)
            proto = result if isinstance(result, onnx.ModelProto) else proto
    if not proto.graph.input:
        raise GraphpruneError(f"the model has no inputs: {label}")
    computed = {name for node in proto.graph.node for name in node.output}
    passive = next((o.name for o in proto.graph.output if o.name not in computed), None)
    if passive is not None:  # onnx2torch's KeyError: it maps every output to a node's
        raise GraphpruneError(f"output '{passive}' of {label} is not computed by the graph (it is an input, a weight "
                              "or a constant once folded): give graphprune a model whose outputs all are")
    missing = unsupported_ops(proto)
    if not missing:
        return proto, proto
    with timed_step("load:to_converter_opset", timings):
        converted, blockers = to_converter_opset(proto, unsupported_ops)
    if converted is None:
        quantised = [op for op in missing if op.split(".")[-1].split("-")[0] in QUANTISED_OPS]
        if quantised:
            raise GraphpruneError(f"{label} is already quantised ({', '.join(quantised)}): give graphprune the float "
                                  "model (--quantize makes and judges its int8 form)")
        raise GraphpruneError(f"unsupported ONNX ops in {label}: {', '.join(blockers or missing)}")
    return converted, proto


# ops of a model quantised already (onnxruntime's static, dynamic and QOperator forms): its float
# weights are gone, so there is nothing to train; the float model is what to bring
QUANTISED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QGemm", "QAttention"}


# The rewrites in order: each edits the proto in place or returns a new one.
REWRITES = [
    ("name_minus_one_sizes", _name_minus_one_sizes),
    ("strip_initializer_inputs", _strip_initializer_inputs),
    ("expand_functions", expand_functions),
    ("constants_to_initializers", _constants_to_initializers),
    ("fold_constants", fold_constants),
    ("simplify", lambda proto: simplify(proto, fuse=False)),
    ("inline_constant_ifs", inline_constant_ifs),
    ("untie_initializers", _untie_initializers),
    ("drop_inert_allowzero", _drop_inert_allowzero),
]
