"""Channels-last image inputs (N, H, W, C), as TensorFlow/Keras models converted to ONNX take them.

Everything in graphprune that feeds images (tiny sets, augmentation, synthesis, example inputs) is
channels-first (N, C, H, W). Rather than teach each of them a second layout, a channels-last
file's fx graph gets one ``permute`` in front: to graphprune the model then takes (N, C, H, W),
and the node after the permute sees exactly the tensor the file's input would have held.

Invariants: the permute is marked ``meta["input_layout"]`` and is no ONNX node; the ONNX writer
maps it back onto the file's own input (``onnx_lower``), so the written model keeps its
channels-last input; onnxruntime is always fed the file's layout (``ort_run.ort_feeds``).
``--input-shape`` is given in the file's layout, as the user sees it.

An input counts as channels-last when it is 4-d, its last dimension is 1, 3 or 4 and its second
is not (a (N, 3, H, 3) input stays channels-first).
"""

from __future__ import annotations

import dataclasses

import torch

from ..model import Model

TO_FILE_LAYOUT = (0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
META_KEY = "input_layout"


def looks_channels_last(shape: tuple) -> bool:
    channels = (1, 3, 4)
    return len(shape) == 4 and shape[3] in channels and shape[1] not in channels


def to_channels_first(model: Model) -> Model:
    """``model`` unchanged, or (for one channels-last image input) with a permute in front."""
    if len(model.inputs) != 1:
        return model
    spec = model.inputs[0]
    declared = model.input_shape or spec.shape
    if not looks_channels_last(tuple(declared)):
        return model
    gm = model.graph_module
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholder):
        permute = gm.graph.call_function(torch.permute, (placeholder, TO_FILE_LAYOUT))
    placeholder.replace_all_uses_with(permute, delete_user_cb=lambda user: user is not permute)
    permute.meta[META_KEY] = "channels_last"
    gm.recompile()
    n, h, w, c = spec.shape
    model.inputs = (dataclasses.replace(spec, shape=(n, c, h, w)),)
    if model.input_shape is not None:
        n, h, w, c = model.input_shape
        model.input_shape = (n, c, h, w)
    model.meta[META_KEY] = "channels_last"
    return model


def is_channels_last(model: Model) -> bool:
    """Whether ``model`` carries the permute of :func:`to_channels_first` (feed files NHWC)."""
    return model.meta.get(META_KEY) == "channels_last"
