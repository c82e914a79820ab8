"""Half precision for GPU targets: the ``fp16`` config (:data:`~graphprune.passes.quantize.HALF`).

int8 on onnxruntime's CUDA provider gains little without TensorRT, so a CUDA target's one candidate
is float16 weights and compute (onnxruntime's converter), inputs and outputs still float32, the
nodes of its float groups kept in float32 as int8 keeps them in float; nothing is calibrated. The
file's metadata says how it was made, as an int8 file's does, so the plan measures and judges it
as it does int8.
"""

from __future__ import annotations

import json

import onnx

from ..errors import GraphpruneError, first_line
from ..formats.onnx_opset import default_opset
from ..formats.ort_run import cpu_session
from .float_groups import float_group_nodes, name_nodes
from .calibration import quiet
from .quantize import INFO_KEY, QuantConfig


def to_float16(proto: onnx.ModelProto, float_groups: tuple[str, ...] = ()) -> onnx.ModelProto:
    """``proto`` with float16 weights and compute, its inputs and outputs still float32 (GPU
    targets; onnxruntime's own converter, its default list of ops kept in float32), the nodes of
    ``float_groups`` (roles, as for int8) too. Says in its metadata how it was made, as
    :func:`quantize_onnx`'s int8 models do."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    named = onnx.ModelProto()
    named.CopyFrom(proto)
    name_nodes(named)  # node_block_list works by name
    kept = [name for group in float_groups for name in float_group_nodes(named, group)]
    try:
        with quiet():
            half = convert_float_to_float16(named, keep_io_types=True, node_block_list=kept or None)
    except Exception as exc:
        raise GraphpruneError(f"cannot convert the model to float16: {first_line(exc)}") from None
    cpu_session(half, "the float16 model")
    opset = default_opset(proto)
    info = {"config": QuantConfig.half(tuple(float_groups)).to_dict(), "input_opset": opset,
            "opset": default_opset(half), "float_nodes": kept, "calibration_images": 0, "notes": []}
    half.metadata_props.add(key=INFO_KEY, value=json.dumps(info))
    return half
