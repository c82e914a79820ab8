"""Augmentation for recovery: the same random view of a batch is shown to teacher and student.

``auto`` picks by image size: random crop after padding by 1/8 of the side plus a horizontal flip
for small images (CIFAR's recipe), random-resized crop (area 35-100%, aspect 3/4-4/3) plus flip for
large ones (ImageNet's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import GraphpruneError


def augmenter(kind: str, size):
    """``f(x, generator)``: a fresh random augmentation of the batch ``x`` (N, C, H, W)."""
    height, width = int(size[0]), int(size[1])
    if kind == "auto":
        kind = "crop-flip" if max(height, width) <= 64 else "resized-crop-flip"
    if kind == "none":
        return lambda x, gen: x
    if kind == "crop-flip":
        pad = max(1, min(height, width) // 8)
        return lambda x, gen: _flip(_padded_crop(x, pad, gen), gen)
    if kind == "resized-crop-flip":
        return lambda x, gen: _flip(_resized_crop(x, gen), gen)
    if kind == "resized-crop-flip-mixup":
        return lambda x, gen: mixup(_flip(_resized_crop(x, gen), gen), gen)
    raise GraphpruneError(f"unknown augmentation '{kind}' (auto, crop-flip, resized-crop-flip, "
                          "resized-crop-flip-mixup, none)")


def mixup(x: torch.Tensor, gen: torch.Generator, fraction: float = 1.0) -> torch.Tensor:
    """``fraction`` of the batch's images (drawn) each blended with a random image of the batch,
    ``lam x_i + (1 - lam) x_j``, ``lam ~ U(0, 1)``: inputs no tiny set holds, which the teacher labels
    as well as any (mimicking needs no label; function matching, Beyer et al. 2022)."""
    n = x.shape[0]
    chosen = torch.rand(n, generator=gen) < fraction
    partner = torch.randint(0, n, (n,), generator=gen)
    lam = torch.rand(n, 1, 1, 1, generator=gen, dtype=x.dtype)
    return torch.where(chosen.view(n, 1, 1, 1), lam * x + (1 - lam) * x[partner], x)


def _padded_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.35, 1.0)) -> torch.Tensor:
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        area = h * w * float(torch.empty(1).uniform_(*scale, generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x
