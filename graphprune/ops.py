"""What each fx node computes, in one vocabulary for every front end.

Models reach graphprune as fx graphs from three front ends: ``torch.fx.symbolic_trace`` (torch.nn
modules and Python functions), ``torch.export`` (aten ops) and onnx2torch (one module per ONNX node,
whose ONNX op type we keep in ``node.meta["onnx_op"]``). :func:`op_kind` maps each node to one
lower-case kind (``"add"``, ``"conv"``, ``"relu"``, ...) so that analyses never look at the front
end. :func:`constant_nodes` finds the nodes whose value does not depend on the inputs' values
(weights, shape arithmetic), which the block finder treats as constants.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx, nn

# ONNX op type -> kind. Anything not listed maps to its lower-cased op type.
_ONNX_KINDS = {
    "Add": "add", "Sum": "add", "Sub": "sub", "Mul": "mul", "Div": "div",
    "Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "matmul",
    "Relu": "relu", "Clip": "clip", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid",
    "HardSigmoid": "hardsigmoid", "HardSwish": "hardswish", "Gelu": "gelu", "Elu": "elu",
    "Selu": "selu", "Softmax": "softmax", "Tanh": "tanh", "Erf": "erf",
    "BatchNormalization": "batch_norm", "LayerNormalization": "layer_norm",
    "InstanceNormalization": "instance_norm", "GroupNormalization": "group_norm",
    "MaxPool": "max_pool", "AveragePool": "avg_pool", "GlobalAveragePool": "avg_pool",
    "GlobalMaxPool": "max_pool", "Pad": "pad", "Slice": "slice", "Identity": "identity",
    "Dropout": "identity", "Reshape": "reshape", "Flatten": "reshape", "Squeeze": "reshape",
    "Unsqueeze": "reshape", "Transpose": "permute", "Concat": "cat", "Shape": "shape",
    "Size": "shape", "Constant": "constant", "ConstantOfShape": "constant_of_shape",
    "Gather": "gather", "Cast": "cast", "ReduceMean": "mean",
}

_MODULE_KINDS = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose", nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm",
    nn.InstanceNorm1d: "instance_norm", nn.InstanceNorm2d: "instance_norm",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Mish: "mish",
    nn.Softmax: "softmax", nn.Dropout: "identity", nn.Dropout2d: "identity",
    nn.Identity: "identity", nn.MaxPool1d: "max_pool", nn.MaxPool2d: "max_pool",
    nn.MaxPool3d: "max_pool", nn.AvgPool1d: "avg_pool", nn.AvgPool2d: "avg_pool",
    nn.AvgPool3d: "avg_pool", nn.AdaptiveAvgPool1d: "avg_pool", nn.AdaptiveAvgPool2d: "avg_pool",
    nn.AdaptiveAvgPool3d: "avg_pool", nn.AdaptiveMaxPool2d: "max_pool", nn.Flatten: "reshape",
    nn.MultiheadAttention: "attention",
}

# Python / torch / aten callable names -> kind (after stripping aten overload suffixes).
_NAME_KINDS = {
    "add": "add", "add_": "add", "iadd": "add", "__add__": "add", "__iadd__": "add", "sub": "sub",
    "mul": "mul", "mul_": "mul", "imul": "mul", "truediv": "div", "div": "div",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "conv_transpose2d": "conv_transpose", "linear": "linear", "addmm": "linear",
    "matmul": "matmul", "mm": "matmul", "bmm": "matmul", "einsum": "matmul",
    "relu": "relu", "relu_": "relu", "relu6": "relu6", "hardtanh": "hardtanh", "hardtanh_": "hardtanh",
    "gelu": "gelu", "silu": "silu", "silu_": "silu", "hardswish": "hardswish",
    "hardswish_": "hardswish", "hardsigmoid": "hardsigmoid", "sigmoid": "sigmoid", "tanh": "tanh",
    "softmax": "softmax", "_softmax": "softmax", "leaky_relu": "leaky_relu", "elu": "elu",
    "batch_norm": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "layer_norm": "layer_norm",
    "native_layer_norm": "layer_norm", "group_norm": "group_norm", "native_group_norm": "group_norm",
    "dropout": "identity", "stochastic_depth": "identity", "clone": "identity",
    "contiguous": "identity", "detach": "identity", "alias": "identity",
    "max_pool2d": "max_pool", "max_pool2d_with_indices": "max_pool", "avg_pool2d": "avg_pool",
    "adaptive_avg_pool2d": "avg_pool", "_adaptive_avg_pool2d": "avg_pool", "mean": "mean",
    "pad": "pad", "constant_pad_nd": "pad", "getitem": "getitem", "slice": "slice",
    "select": "slice", "narrow": "slice", "reshape": "reshape", "view": "reshape",
    "flatten": "reshape", "_unsafe_view": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "permute": "permute", "transpose": "permute", "t": "permute", "cat": "cat", "concat": "cat",
    "size": "shape", "sym_size": "shape", "dim": "shape", "getattr": "getattr",
    "scaled_dot_product_attention": "attention", "multi_head_attention_forward": "attention",
    "zeros_like": "constant_like", "ones_like": "constant_like", "full_like": "constant_like",
}

ELEMENTWISE_BINARY = frozenset({"add", "sub", "mul", "div"})
ACTIVATIONS = frozenset({"relu", "relu6", "hardtanh", "clip", "gelu", "silu", "hardswish",
                         "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "mish"})
NORMS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm"})
WEIGHTED_KINDS = frozenset({"conv", "conv_transpose", "linear", "matmul", "attention", "other"})
# Kinds that never change a value in inference (dropping them changes nothing).
NO_OPS = frozenset({"identity"})
# Kinds whose output is >= 0 for any input, and kinds that keep a >= 0 input >= 0.
_NONNEG_OUTPUT = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softmax"})
_NONNEG_PRESERVING = frozenset({"identity", "max_pool", "avg_pool", "mean", "reshape", "permute",
                                "slice", "getitem", "cat", "pad", "add", "mul"})


def _callable_name(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    # aten overloads look like "add.Tensor"; torch.ops.aten.add.Tensor.__name__ == "add.Tensor".
    return name.split(".")[0]


def op_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """The kind of computation ``node`` performs (see the module docstring)."""
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "get_attr":
        return "constant"
    onnx_op = node.meta.get("onnx_op")
    if node.op == "call_module":
        module = gm.get_submodule(node.target) if gm is not None else None
        for cls in type(module).__mro__ if module is not None else ():
            if cls in _MODULE_KINDS:  # onnx2torch turns Clip(0) into nn.ReLU, Gemm into nn.Linear
                return _MODULE_KINDS[cls]
        if onnx_op is not None:
            return _ONNX_KINDS.get(onnx_op, onnx_op.lower())
        cls_name = type(module).__name__.lower() if module is not None else ""
        if "stochasticdepth" in cls_name or "droppath" in cls_name:
            return "identity"
        return "other" if module is not None and any(True for _ in module.parameters()) else cls_name or "other"
    name = _callable_name(node.target)
    if name == "hardtanh" and node.args[1:3] == (0.0, 6.0):
        return "relu6"
    return _NAME_KINDS.get(name, name.lower())


def module_parameters(node: fx.Node, gm: fx.GraphModule) -> list[torch.Tensor]:
    """Parameters and buffers owned by the module a ``call_module`` node calls (else [])."""
    if node.op != "call_module":
        return []
    module = gm.get_submodule(node.target)
    return list(module.parameters()) + list(module.buffers())


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_multi_output(node: fx.Node) -> bool:
    """True for a node whose value is a tuple of tensors (an ONNX ``Split``, ``torch.chunk``): read
    only through ``getitem``, never a tensor to cache, feed or fit an adaptor on."""
    return bool(node.users) and all(u.op == "call_function" and u.target is operator.getitem
                                    and isinstance(u.args[1], int) for u in node.users)  # x[:, :8] is a tensor's


def merge_duplicate_getitems(gm: fx.GraphModule) -> int:
    """One ``getitem`` node per output of a multi-output node (onnx2torch makes one per reader),
    so that a ``Split`` output read by a residual branch and its shortcut is one value, the
    block's entry; returns how many duplicates went."""
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or node.kwargs:
            continue
        key = (node.args[0], node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], int) else None
        if key is None:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            first[key] = node
    if merged:
        gm.recompile()
    return merged


def iter_input_nodes(node: fx.Node) -> Iterable[fx.Node]:
    """Every fx node ``node`` reads, from args and kwargs, in order."""
    return node.all_input_nodes


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Every node ``node`` reads, one entry per argument slot: a Concat that reads a Split's half
    and, where a block was dropped, the same half again in the block's place lists it twice."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value does not depend on the values of the graph inputs.

    Weights (``get_attr``), values computed only from weights (a reshaped bias, a positional
    embedding, a relative-position table), and shape arithmetic (``Shape``/``size`` and what is
    computed only from shapes) are constants here: an add with such an operand is a bias, never a
    residual merge.
    """
    constants: set[fx.Node] = set()
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if node.op == "get_attr" or kind in ("constant", "shape", "getattr" if _is_shape_attr(node) else "-"):
            constants.add(node)
            continue
        if node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        if kind == "constant_of_shape" or (inputs and all(i in constants for i in inputs)):
            constants.add(node)
        elif not inputs and node.op in ("call_function", "call_method", "call_module"):
            constants.add(node)  # a factory (torch.arange, an ONNX Constant without inputs)
    return constants


def _is_shape_attr(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
        node.args[1] in ("shape", "dtype", "device", "ndim")


def reads_shape_only(node: fx.Node, gm: fx.GraphModule) -> bool:
    """``node`` reads its input's shape (or dtype, device), never its values: ``Shape``, ``size``, ``.shape``."""
    return _is_shape_attr(node) or op_kind(node, gm) == "shape"


def node_tensor_constants(node: fx.Node, gm: fx.GraphModule, constants: set[fx.Node]) -> list:
    """Float tensors of dimension >= 2 that ``node`` reads as weights (module params or constants)."""
    found = [p for p in module_parameters(node, gm) if p.is_floating_point() and p.dim() >= 2]
    for inp in node.all_input_nodes:
        if inp in constants:
            val = inp.meta.get("tensor_meta")
            shape = getattr(val, "shape", None)
            dtype = getattr(val, "dtype", None)
            if inp.op == "get_attr":
                attr = fetch_attr(gm, inp.target)
                if isinstance(attr, torch.Tensor):
                    shape, dtype = attr.shape, attr.dtype
            if shape is not None and len(shape) >= 2 and dtype is not None and dtype.is_floating_point:
                found.append(inp)
    return found


def is_weighted(node: fx.Node, gm: fx.GraphModule, constants: set[fx.Node]) -> bool:
    """True for a conv, linear, matmul or attention that carries weights of dimension >= 2."""
    kind = op_kind(node, gm)
    if kind in ELEMENTWISE_BINARY or kind in NORMS or kind in ACTIVATIONS:
        return False
    return bool(node_tensor_constants(node, gm, constants))


def is_nonnegative(node: fx.Node, gm: fx.GraphModule, memo: dict | None = None) -> bool:
    """A conservative proof that ``node``'s output is >= 0 for every input."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    memo[node] = False  # guards against cycles (there are none in a DAG, but be safe)
    kind = op_kind(node, gm)
    if kind in _NONNEG_OUTPUT or (kind == "clip" and _clip_min_nonnegative(node, gm)):
        result = True
    elif kind == "hardtanh":
        result = len(node.args) > 1 and isinstance(node.args[1], (int, float)) and node.args[1] >= 0
    elif kind in _NONNEG_PRESERVING:
        tensor_inputs = [i for i in node.all_input_nodes if op_kind(i, gm) not in ("constant", "shape")]
        if kind == "pad" and not _pads_with_zero(node):
            result = False
        else:
            result = bool(tensor_inputs) and all(is_nonnegative(i, gm, memo) for i in tensor_inputs)
    else:
        result = False
    memo[node] = result
    return result


def _clip_min_nonnegative(node: fx.Node, gm: fx.GraphModule) -> bool:
    # onnx2torch's Clip keeps min/max as module attributes or as constant inputs.
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    low = getattr(module, "min_val", None)
    if low is None and len(node.args) > 1 and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        low = fetch_attr(gm, node.args[1].target)
    if isinstance(low, torch.Tensor):
        low = low.item() if low.numel() == 1 else None
    return isinstance(low, (int, float)) and low >= 0


def _pads_with_zero(node: fx.Node) -> bool:
    if node.meta.get("onnx_op") == "Pad":
        return node.meta.get("pad_value_zero", False)
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return mode == "constant" and (value in (0, 0.0, None))


def is_same_idempotent(act: fx.Node, inner: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``act`` applied to ``inner``'s output changes nothing (relu of a >= 0 value)."""
    kind = op_kind(act, gm)
    if kind == "relu" or (kind == "clip" and _clip_min_nonnegative(act, gm) and _clip_max(act, gm) is None):
        return is_nonnegative(inner, gm)
    return False


def _clip_max(node: fx.Node, gm: fx.GraphModule):
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    high = getattr(module, "max_val", None)
    return high


def is_binary_add(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An add of exactly two tensors with unit scale (``a + b``, ``torch.add``, ONNX Add/Sum)."""
    if op_kind(node, gm) != "add":
        return False
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) != 2 or len(node.args) != 2:
        return False
    alpha = node.kwargs.get("alpha", 1)
    return alpha == 1 and not any(k for k in node.kwargs if k not in ("alpha",))
