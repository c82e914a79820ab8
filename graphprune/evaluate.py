"""Accuracy of a model on a labelled set, or its top-1 agreement with a reference model: the fx
graph (:func:`evaluate`) or a written ONNX file as onnxruntime runs it (:func:`evaluate_onnx`, for
an int8 model that only exists as ONNX), with the same metrics."""

from __future__ import annotations

import onnx
import torch

from .data import TinySet
from .features import run_batched
from .model import Model


def predictions(model: Model, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    return run_batched(model.graph_module, images, batch_size).argmax(1)


def evaluate(model: Model, data: TinySet, reference: Model | None = None) -> dict:
    """``{"top1": ...}`` when ``data`` has labels; ``{"agreement": ...}`` with ``reference``."""
    return metrics(predictions(model, data.images), data, reference)


def evaluate_onnx(proto: onnx.ModelProto, data: TinySet, reference: Model | None = None, batch_size: int = 250) -> dict:
    """:func:`evaluate` for an ONNX model run by onnxruntime on the CPU, batched and fed in the
    file's own input layout and type (``ort_feeds``); a file with a fixed batch runs whole batches
    of it only, so the images it leaves over are not counted."""
    from .passes.quantize import cpu_session, run_outputs

    outputs = run_outputs(cpu_session(proto), data.images, batch_size)
    pred = torch.as_tensor(outputs).argmax(1)
    return metrics(pred, data.subset(range(len(pred))) if len(pred) < len(data) else data, reference)


def metrics(pred: torch.Tensor, data: TinySet, reference: Model | None = None) -> dict:
    """Top-1 of predictions ``pred`` on ``data`` (labelled) and their agreement with ``reference``'s."""
    result: dict = {"images": len(data)}
    if data.has_labels:
        result["top1"] = float((pred == data.labels).float().mean())
    if reference is not None:
        result["agreement"] = float((pred == predictions(reference, data.images)).float().mean())
    return result
