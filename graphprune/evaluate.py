"""Accuracy of a model on a labelled set, or its top-1 agreement with a reference model."""

from __future__ import annotations

import torch

from .data import TinySet
from .features import run_batched
from .model import Model


def predictions(model: Model, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    return run_batched(model.graph_module, images, batch_size).argmax(1)


def evaluate(model: Model, data: TinySet, reference: Model | None = None) -> dict:
    """``{"top1": ...}`` when ``data`` has labels; ``{"agreement": ...}`` with ``reference``."""
    result: dict = {"images": len(data)}
    pred = predictions(model, data.images)
    if data.has_labels:
        result["top1"] = float((pred == data.labels).float().mean())
    if reference is not None:
        result["agreement"] = float((pred == predictions(reference, data.images)).float().mean())
    return result
