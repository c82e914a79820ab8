"""The modules :mod:`~graphprune.formats.batch_trace` swaps into a fixed-batch graph where its
constants spell out the batch of 1: each does at batch 1 exactly what the ONNX node did, and at a
batch of N what the node would do had the export kept the batch free."""

from __future__ import annotations

import torch


class ReshapeToBatched(torch.nn.Module):
    """ONNX Reshape to fixed sizes but one inferred axis (-1): the sizes input is ignored."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        return torch.reshape(x, self.sizes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class ConcatRepeatingConstants(torch.nn.Module):
    """ONNX Concat whose batch-free inputs (``positions``) are repeated along ``batch_axis`` to the
    batch of the first batched input."""

    def __init__(self, axis: int, batch_axis: int, positions: tuple[int, ...]):
        super().__init__()
        self.axis, self.batch_axis, self.positions = axis, batch_axis, tuple(positions)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batched = next(t for i, t in enumerate(tensors) if i not in self.positions)
        batch = batched.shape[self.batch_axis]
        tensors = [t.expand(*[batch if d == self.batch_axis else -1 for d in range(t.dim())])
                   if i in self.positions else t for i, t in enumerate(tensors)]
        return torch.cat(tensors, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, batch_axis={self.batch_axis}, repeated={self.positions}"


class GatherEachImage(torch.nn.Module):
    """ONNX Gather on axis 0 of a tensor whose axis 0 holds the images one after another
    (``rows`` rows each): the same constant indices taken from every image, stacked on axis 0."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.where(indices < 0, indices + self.rows, indices).long()
        images = x.shape[0] // self.rows
        offsets = torch.arange(images, device=x.device).view(-1, *[1] * indices.dim()) * self.rows
        return x[(indices.unsqueeze(0) + offsets).reshape(-1, *indices.shape[1:])]

    def extra_repr(self) -> str:
        return f"rows={self.rows}"
