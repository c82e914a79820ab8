"""Recovery's augmentation (graphprune/augment.py): shapes kept, the same generator gives the same
view, mixup blends two images of the batch, unknown kinds refused in one line."""

from __future__ import annotations

import pytest
import torch

from graphprune.augment import augmenter
from graphprune.errors import GraphpruneError

KINDS = ("auto", "crop-flip", "resized-crop-flip", "resized-crop-flip-mixup", "none")


@pytest.mark.parametrize("kind", KINDS)
def test_views_keep_the_shape_and_follow_the_generator(kind):
    x = torch.rand(6, 3, 24, 20)
    augment = augmenter(kind, x.shape[-2:])
    first = augment(x, torch.Generator().manual_seed(1))
    again = augment(x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and torch.equal(first, again)
    if kind == "none":
        assert torch.equal(first, x)


def test_mixup_blends_each_image_with_one_of_the_batch():
    # constant images: whatever the crop and flip, a blend of images a and b is a constant between them
    values = torch.tensor([0.0, 1.0, 10.0, 100.0])
    x = values.view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    out = augmenter("resized-crop-flip-mixup", (16, 16))(x, torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))
    mixed = per_image[:, 0]
    assert bool(((mixed >= 0) & (mixed <= 100)).all())
    assert not torch.allclose(mixed, values)  # some image was blended with another


def test_unknown_kind_is_refused_in_one_line():
    with pytest.raises(GraphpruneError, match="unknown augmentation 'cutout'"):
        augmenter("cutout", (8, 8))
