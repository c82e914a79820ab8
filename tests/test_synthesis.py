"""Data-free tiny sets: procedural images and BatchNorm inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.data import Preprocessing
from graphprune.synthesis import (SynthesisSettings, bn_inversion_images, bn_statistics_loss, has_batchnorm,
                                  procedural_images, resolve_method, synthetic_tiny_set)
from onnx_builders import residual_onnx, save


def test_procedural_images_are_reproducible_and_varied():
    a = procedural_images(6, 24, 20, seed=3)
    b = procedural_images(6, 24, 20, seed=3)
    c = procedural_images(6, 24, 20, seed=4)
    assert a.shape == (6, 24, 20, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 20 and len({img.tobytes() for img in a}) == 6


def test_bn_inversion_lowers_its_statistics_loss():
    model = gp.load("zoo:cifar10_resnet20")
    gm = model.graph_module
    torch.manual_seed(0)
    with torch.no_grad():  # give the BatchNorms statistics that random noise does not have
        for m in gm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    settings = SynthesisSettings(method="bn-inversion", num_samples=8, batch_size=8, steps=30, seed=0)
    images = bn_inversion_images(model, settings, mean, std, show_progress=False)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    to_input = lambda imgs: (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert bn_statistics_loss(model, to_input(images)) < 0.8 * bn_statistics_loss(model, to_input(noise))


def test_method_choice_and_cache(tmp_path):
    torch_model = gp.load("zoo:cifar10_resnet20")
    onnx_model = gp.load(save(residual_onnx(), tmp_path / "m.onnx"))
    assert has_batchnorm(torch_model) and not has_batchnorm(onnx_model)
    assert resolve_method(torch_model, "auto") == "bn-inversion"
    assert resolve_method(onnx_model, "auto") == "procedural"
    with pytest.raises(gp.GraphpruneError, match="BatchNorm"):
        resolve_method(onnx_model, "bn-inversion")
    prep = Preprocessing((4, 8, 8), (0.5,), (0.5,))
    settings = SynthesisSettings(num_samples=5, seed=1)
    first, method = synthetic_tiny_set(onnx_model, settings, prep, tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("synthetic-*.npz"))
    assert method == "procedural" and len(cached) == 1
    second, _ = synthetic_tiny_set(onnx_model, settings, prep, tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.images.shape == (5, 4, 8, 8)
    assert torch.isfinite(first.images).all()
