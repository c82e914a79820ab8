"""Small hand-written ONNX graphs for loader and error tests (no exporter involved)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def residual_onnx(opset: int = 13, weights_as: str = "initializer", dynamic_spatial: bool = False,
                  extra_op: str | None = None, seed: int = 0, branch_activation: str = "Relu") -> onnx.ModelProto:
    """X -> [Conv -> Relu -> Conv] + X -> Relu -> GAP -> Flatten -> Gemm (one identity block).

    ``weights_as``: ``"initializer"``, ``"constant"`` (Constant nodes), ``"input"`` (graph inputs
    backed by initializers, as old exporters wrote them) or ``"computed"`` (each weight made at run
    time: ``ConstantOfShape(shape) * values``, as onnx's ``light_*`` models make theirs, in an IR-3
    file whose initializers are all graph inputs). ``branch_activation``: the op between the
    block's two convs (e.g. ``"Gelu"``, an op since opset 20).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 0.3, (3, 4)).astype(np.float32)
    fcb = rng.normal(0, 0.1, (3,)).astype(np.float32)
    weights = {"w1": w1, "w2": w2, "fc": fc, "fcb": fcb}
    nodes, inits, extra_inputs = [], [], []
    for name, value in weights.items():
        if weights_as == "constant":
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif weights_as == "computed":
            inits += [numpy_helper.from_array(np.array(value.shape, np.int64), f"{name}_shape"),
                      numpy_helper.from_array(value / 2, f"{name}_half")]
            nodes += [helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_two"],
                                       value=numpy_helper.from_array(np.array([2.0], np.float32))),
                      helper.make_node("Mul", [f"{name}_two", f"{name}_half"], [name])]
        else:
            inits.append(numpy_helper.from_array(value, name))
            if weights_as == "input":
                extra_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape))
    nodes += [
        helper.make_node("Relu", ["X"], ["x0"], name="/stem/Relu"),
        helper.make_node("Conv", ["x0", "w1"], ["c1"], name="/block/conv1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node(branch_activation, ["c1"], ["r1"], name=f"/block/relu/{branch_activation}"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/block/conv2/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x0"], ["s"], name="/block/Add"),
        helper.make_node("Relu", ["s"], ["r2"], name="/block/relu_1/Relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["g"], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["Y"], name="/fc/Gemm", transB=1),
    ]
    if extra_op:
        nodes.insert(-1, helper.make_node(extra_op, ["f"], ["f2"], name="/odd"))
        nodes[-1].input[0] = "f2"
    spatial = ["h", "w"] if dynamic_spatial else [8, 8]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, *spatial]), *extra_inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 7 if opset < 15 else 8)
    if weights_as == "computed":
        model.ir_version = 3
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)
    onnx.checker.check_model(model)
    return model


def channels_last_residual() -> onnx.ModelProto:
    """:func:`residual_onnx` behind a channels-last input: (batch, 8, 8, 3) -> Transpose -> 1x1 Conv to 4."""
    proto = residual_onnx()
    proto.graph.initializer.append(numpy_helper.from_array(np.full((4, 3, 1, 1), 0.5, np.float32), "w0"))
    proto.graph.node.insert(0, helper.make_node("Conv", ["nchw", "w0"], ["X"], name="/stem0/Conv"))
    proto.graph.node.insert(0, helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2], name="/t"))
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("nhwc", TensorProto.FLOAT, ["batch", 8, 8, 3]))
    onnx.checker.check_model(proto)
    return proto


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def unknown_rank_norm(then: str = "BatchNormalization", seed: int = 0) -> onnx.ModelProto:
    """X -> Conv -> Relu -> Reshape(to a shape computed at run time) -> ``then``: shape inference
    gives the Reshape's output no rank (PaddleOCR's recogniser has this), which onnx2torch's
    BatchNormalization and pooling converters need. ``then``: ``"BatchNormalization"`` or ``"MaxPool"``."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1, 2], np.int64), "tail")]
    nodes = [helper.make_node("Conv", ["X", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
             helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
             helper.make_node("Shape", ["r"], ["shape"], name="/Shape"),
             helper.make_node("Slice", ["shape", "zero", "two", "zero"], ["lead"], name="/Slice"),
             helper.make_node("Concat", ["lead", "tail"], ["new_shape"], axis=0, name="/Concat"),
             helper.make_node("Reshape", ["r", "new_shape"], ["flat"], name="/Reshape")]
    if then == "BatchNormalization":
        for name, value in (("scale", rng.uniform(0.5, 1.5, 4)), ("bias", rng.normal(0, 0.1, 4)),
                            ("mean", rng.normal(0, 0.1, 4)), ("var", rng.uniform(0.5, 1.5, 4))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node(then, ["flat", "scale", "bias", "mean", "var"], ["Y"], name="/bn/Norm"))
        out_shape = ["batch", 4, 32, 2]
    else:
        nodes.append(helper.make_node(then, ["flat"], ["Y"], kernel_shape=[2, 1], strides=[2, 1], name="/pool"))
        out_shape = ["batch", 4, 16, 2]
    graph = helper.make_graph(nodes, "unknown_rank", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def with_metadata(model: onnx.ModelProto, **props: str) -> onnx.ModelProto:
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model
