"""Activations that hold their batch on axis 1 (CLIP's and DETR's (L, N, D) tokens, an LSTM's
(T, N, H)): noted at load (formats/batch_axis.note_batch_axes), cached batch first
(features.truncate), fed back in the graph's own layout (features.suffix_from). A CLIP-style
transformer stopped scoring with an internal error ('The size of tensor a (80) must match the size
of tensor b (68) at non-singleton dimension 0': tokens of 5 batches concatenated along L)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.data import TinySet
from graphprune.features import run_batched, truncate
from graphprune.formats.batch_axis import BATCH_AXIS
from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks
from conftest import optimized_file_agrees


class _Block(nn.Module):
    def __init__(self, width, sequence_first):
        super().__init__()
        self.sequence_first = sequence_first
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=not sequence_first)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokenNet(nn.Module):
    """Patches, a class token, transformer blocks, a classifier; ``sequence_first``: the blocks run
    on (L, N, D), as CLIP's visual transformer permutes them (``NLD -> LND``), else on (N, L, D).
    The same weights either way."""

    def __init__(self, sequence_first, width=32, layers=3, classes=10):
        super().__init__()
        self.sequence_first = sequence_first
        self.patch = nn.Conv2d(3, width, 8, 8)
        self.cls, self.pos = nn.Parameter(torch.randn(width) * 0.02), nn.Parameter(torch.randn(17, width) * 0.02)
        self.blocks = nn.Sequential(*[_Block(width, sequence_first) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        if self.sequence_first:
            x = self.blocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        else:
            x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def _onnx(sequence_first, tmp_path):
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(TokenNet(sequence_first).eval(), (torch.randn(2, 3, 32, 32),), buffer, opset_version=17,
                      dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    path = tmp_path / f"tokens_{sequence_first}.onnx"
    path.write_bytes(buffer.getvalue())
    return gp.load(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    return _onnx(True, folder), _onnx(False, folder)


def _images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_block_values_are_noted_and_cached_batch_first_alike(models):
    sequence_first, batch_first = models
    first_blocks, other_blocks = gp.find_blocks(sequence_first), gp.find_blocks(batch_first)
    assert len(first_blocks) == len(other_blocks) == 6
    nodes = {n.name: n for n in sequence_first.graph_module.graph.nodes}
    assert all(nodes[b.exit].meta.get(BATCH_AXIS) == 1 for b in first_blocks)
    others = {n.name: n for n in batch_first.graph_module.graph.nodes}  # inside attention: (L, N, D) too
    assert not any(BATCH_AXIS in others[b.exit].meta or BATCH_AXIS in others[b.entry].meta for b in other_blocks)
    images = _images(20)  # batches of 8, 8 and 4
    for a, b in zip(first_blocks, other_blocks):
        cached = run_batched(truncate(sequence_first.graph_module, a.exit), images, batch_size=8)
        assert cached.shape == (20, 17, 32)
        assert torch.allclose(cached, run_batched(truncate(batch_first.graph_module, b.exit), images), atol=1e-5)


def test_blocks_score_alike_whichever_axis_holds_the_batch(models):
    images = _images(56)
    train, holdout = TinySet(images[:40], -torch.ones(40, dtype=torch.long)), \
        TinySet(images[40:], -torch.ones(16, dtype=torch.long))
    settings = RecoverabilitySettings(iterations=6, batch_size=16)
    scores = [score_blocks(model, gp.find_blocks(model), train, holdout, settings, show_progress=False)
              for model in models]
    for a, b in zip(*scores):
        assert a.before_fit == pytest.approx(b.before_fit, rel=1e-3)
        assert a.recoverability == pytest.approx(b.recoverability, rel=1e-2, abs=1e-6)


@pytest.mark.slow  # about 20 s
def test_optimize_drops_sequence_first_blocks_and_writes_what_onnxruntime_runs(models, tmp_path):
    from test_vit import FAST_CONFIG

    optimized_file_agrees(models[0], _images(40), FAST_CONFIG, tmp_path / "fast.onnx")


class _EncoderNet(nn.Module):
    """Patches through ``nn.TransformerEncoder`` in its default layout, (L, N, D)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).permute(2, 0, 1)
        return self.head(self.encoder(tokens).mean(0))


@pytest.mark.slow  # about 15 s
def test_an_nn_transformer_encoder_is_traced_into_and_optimized(tmp_path):
    """fx keeps torch.nn modules whole: the encoder was one node and no block was found; such a
    module is exported with torch.export instead, its layers' attention and MLP become blocks, and
    their (L, N, D) values are cached batch first."""
    from test_vit import FAST_CONFIG

    torch.manual_seed(0)
    net = _EncoderNet().eval()
    model = gp.load(net, input_shape=(1, 3, 32, 32))
    assert [b.name for b in gp.find_blocks(model)] == ["encoder.layers.0.self_attn", "encoder.layers.0.linear1",
                                                      "encoder.layers.1.self_attn", "encoder.layers.1.linear1"]
    x = _images(3, seed=7)
    assert torch.allclose(model.run(x), net(x), atol=1e-5)
    optimized_file_agrees(model, _images(40), FAST_CONFIG, tmp_path / "fast.onnx")
