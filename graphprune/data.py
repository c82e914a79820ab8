"""The tiny set: raw images (:mod:`graphprune.data_sources`: a folder, a labels CSV or an ``.npz``),
sampled, resized, normalised and split.

* ``num_samples`` images are drawn with ``seed`` (round-robin over classes when labels exist, so
  the draw is class-balanced), resized (shorter side to the model's size, or to that size divided
  by ``crop``: 0.875 is ImageNet's 256 -> 224) and centre-cropped to the model's input size,
  converted to the model's channel count (grey, RGB and RGBA: a 4-channel model gets grey and
  RGB images opaque, alpha 1; any other count is one line naming the data), and normalised with
  ``mean``/``std``.
* :func:`split_holdout` keeps a held-out part (default 20%, at least 16 images) to measure
  recoverability on images the adaptors never trained on.
Unreadable files are skipped, counted and the first named in one line; a set with no readable
image is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data_sources import read_source, sample_indices  # noqa: F401  (sample_indices: part of this API)
from .errors import GraphpruneError

log = logging.getLogger("graphprune")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_LABEL = 2**31 - 1


@dataclass
class TinySet:
    """Normalised images (N, C, H, W float32) and labels (N,; -1 when unknown)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""
    skipped: int = 0
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self) > 0

    def subset(self, index) -> "TinySet":
        index = torch.as_tensor(index, dtype=torch.long)
        return TinySet(self.images[index], self.labels[index], self.source, self.skipped, self.classes)

    def without_labels(self) -> "TinySet":
        """The same images with every label unknown (-1): compared with a reference model, not scored."""
        return TinySet(self.images, torch.full((len(self),), -1, dtype=torch.long), self.source, self.skipped,
                       self.classes)

    def summary(self) -> dict:
        return {"source": self.source, "images": len(self), "skipped_unreadable": self.skipped,
                "labelled": self.has_labels, "shape": list(self.images.shape[1:])}


MAX_RESIZED_SIDE = 16384  # the side ``crop`` may resize an image to: 64 x a 256-px input


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs: ``size`` is (C, H, W)."""

    size: tuple[int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # the centre crop's share of the resized image: 1.0 resizes the shorter side to the model's size;
    # 0.875 is ImageNet's evaluation (shorter side to 256, centre 224). EfficientNet-Lite0 with its
    # ImageNet weights scores 85.1 on the 800 imagenet-eval photos at 1.0, 87.1 at 0.875.
    crop: float = 1.0

    def check(self) -> None:
        if not 0.0 < self.crop <= 1.0:
            raise GraphpruneError(f"crop must be in (0, 1], got {self.crop}", parameter="crop")
        resized = max(self.size[1:]) / self.crop
        if resized > MAX_RESIZED_SIDE:  # every image would be resized to that before its centre crop
            raise GraphpruneError(f"crop {self.crop:g} resizes each image to {resized:,.0f} pixels a side first "
                                  f"(at most {MAX_RESIZED_SIDE:,}): ImageNet's is 0.875", parameter="crop")

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.size[0]
        mean = _fit_channels(self.mean, channels, "mean")
        std = _fit_channels(self.std, channels, "std")
        if any(s <= 0 for s in std):
            raise GraphpruneError("std values must be positive", parameter="std")
        return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def _fit_channels(values, channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1 and len(values) == 3:  # grey model, RGB statistics: use their average
        return (sum(values) / 3,)
    if len(values) == 1:
        return values * channels
    default = " (ImageNet's, the default)" if values == tuple(IMAGENET_MEAN if name == "mean" else IMAGENET_STD) else ""
    raise GraphpruneError(f"{name} has {len(values)} values{default}; the model takes {channels} channels: give "
                          f"--{name} with {channels} values", parameter=name)


def load_tiny_set(path: str | Path, prep: Preprocessing, num_samples: int | None = None,
                  seed: int = 0) -> TinySet:
    """Read, sample and preprocess a tiny set (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"data not found: {path}")
    prep.check()
    raw = read_source(path, num_samples, seed, lambda image: _to_model_size(image, prep.size, str(path), prep.crop))
    if raw.skipped:
        log.warning("%s: skipped %d file%s not readable as an image, or over Pillow's size limit for one (e.g. %s)",
                    path, len(raw.skipped), "s" if len(raw.skipped) > 1 else "", raw.skipped[0].name)
    if not raw.images:
        raise GraphpruneError(f"no readable images in {path}" + (f" ({len(raw.skipped)} unreadable)"
                                                                 if raw.skipped else ""))
    return _preprocess(raw.images, raw.labels, prep, str(path), len(raw.skipped), raw.classes)


def tiny_set_from_array(images: np.ndarray, prep: Preprocessing, source: str) -> TinySet:
    """A tiny set from uint8 (N, H, W, C) images without labels (synthetic data)."""
    prep.check()
    resized = [_to_model_size(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None], prep.size, source,
                              prep.crop) for img in images]
    return _preprocess(resized, [-1] * len(resized), prep, source, 0, [])


def _preprocess(resized, labels, prep: Preprocessing, source: str, skipped: int, classes) -> TinySet:
    """A set of images already at the model's size (:func:`_to_model_size`), normalised; ``resized``
    is emptied (each entry None) as it is copied."""
    if labels and max(labels) > MAX_LABEL:  # a class index, not a number torch's int64 may not hold
        raise GraphpruneError(f"{source}: labels are class indices up to {MAX_LABEL}, got {max(labels)}")
    # one float copy of the set at a time: cat, then normalise, made four (800 photos at 800 x 608 are
    # 4.7 GB, and loading them peaked at 19 GB); each image is freed as it is copied
    images = torch.empty((len(resized), *resized[0].shape[1:]), dtype=resized[0].dtype)
    for index in range(len(resized)):
        images[index] = resized[index][0]
        resized[index] = None
    mean, std = prep.channel_stats()
    images.sub_(mean).div_(std)
    return TinySet(images, torch.as_tensor(labels, dtype=torch.long), source, skipped, classes)


def _to_model_size(image: torch.Tensor, size: tuple[int, int, int], source: str, crop: float = 1.0) -> torch.Tensor:
    """uint8 (1, c, h, w) -> float (1, C, H, W) in [0, 1]: shorter side resized to the model's size
    divided by ``crop``, centre-cropped to the model's size."""
    channels, height, width = size
    x = image.float() / 255.0
    if x.shape[1] == 4 and channels != 4:  # RGBA photo: drop alpha
        x = x[:, :3]
    if channels == 1 and x.shape[1] == 3:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif channels in (3, 4) and x.shape[1] in (1, 3) and x.shape[1] != channels:  # grey to RGB; RGB(A) opaque
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1) if channels == 4 else x
    elif x.shape[1] != channels:
        raise GraphpruneError(f"{source}: images have {x.shape[1]} channels; the model takes {channels} "
                              "(grey, RGB and RGBA images are converted, other counts cannot be)")
    h, w = x.shape[-2:]
    if (h, w) != (height, width) or crop < 1.0:
        scale = max(height / h, width / w) / crop
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[..., top:top + height, left:left + width]
    return x.contiguous()


def split_holdout(tiny: TinySet, fraction: float = 0.2, minimum: int = 16, seed: int = 0) -> tuple[TinySet, TinySet]:
    """(train, held-out): ``max(minimum, fraction * N)`` images held out, never more than half."""
    n = len(tiny)
    if n < 4:
        raise GraphpruneError(f"the tiny set has {n} image{'s' if n != 1 else ''}; need at least 4")
    held = min(max(minimum, round(fraction * n)), n // 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tiny.subset(order[held:]), tiny.subset(order[:held])
