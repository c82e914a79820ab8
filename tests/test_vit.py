"""Vision transformers end to end: attention and MLP sub-blocks on (N, L, C) token tensors are
scored with adaptors that mix the C channels of every token, dropped, recovered and written to
ONNX that onnxruntime runs like the fx graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import graphprune as gp
from conftest import randomise_norms, export_onnx
from graphprune.adaptors import Adaptor
from graphprune.backends.base import LatencySettings
from graphprune.data import TinySet
from graphprune.passes import recoverability as rec
from graphprune.passes.recover import RecoverySettings
from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks
from graphprune.passes.refine_selection import RefineSettings

HIDDEN, TOKENS = 32, 17  # 4x4 patches of 8x8 pixels and the class token
SHAPE = (1, 3, 32, 32)


def small_vit(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2,
                                               hidden_dim=HIDDEN, mlp_dim=64, num_classes=10).eval()
    randomise_norms(vit)
    with torch.no_grad():  # torchvision zero-initialises the head: every output would be its bias
        vit.heads.head.weight.normal_(0, 0.5)
    return vit


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory):
    return export_onnx(small_vit(), SHAPE, tmp_path_factory.mktemp("vit") / "vit.onnx")


def _unlabelled(count: int, seed: int) -> TinySet:
    return TinySet(torch.randn(count, *SHAPE[1:], generator=torch.Generator().manual_seed(seed)), torch.full((count,), -1))


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_adaptors_mix_the_channels_of_every_token(form, vit_onnx, monkeypatch):
    """Every adaptor PRACTISE fits around a dropped ViT block is a C x C map on the last axis of
    (N, L, C) tokens, never an L x L one; a permutation adaptor permutes each token's channels."""
    model = gp.load(small_vit(), input_shape=SHAPE) if form == "torch" else gp.load(vit_onnx)
    blocks = gp.find_blocks(model)
    assert [b.name.rsplit(".", 1)[-1] for b in blocks] == ["self_attention", "mlp"] * 2
    seen = []  # (adaptor, the shape of what it reads) for every adaptor of every fit
    fit = rec.fit_adaptors

    def recording(student, *args, **kwargs):
        adaptors = [m for m in student.modules() if isinstance(m, Adaptor)]
        hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, tuple(args[0].shape)))) for m in adaptors]
        try:
            return fit(student, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
    monkeypatch.setattr(rec, "fit_adaptors", recording)
    scores = score_blocks(model, blocks, _unlabelled(16, 0), _unlabelled(16, 1), RecoverabilitySettings(iterations=2, batch_size=8),
                          show_progress=False)
    assert seen and all(s.recoverability < s.before_fit for s in scores)  # even two steps help
    for adaptor, shape in seen:
        assert shape[1:] == (TOKENS, HIDDEN) and adaptor.dim in (-1, 2), (adaptor.dim, shape)
        assert adaptor.weight.shape == (HIDDEN, HIDDEN)
    tokens = torch.randn(3, TOKENS, HIDDEN)
    perm = torch.randperm(HIDDEN)
    adaptor = seen[0][0]
    with torch.no_grad():
        adaptor.weight.copy_(torch.eye(HIDDEN)[perm])
    assert torch.equal(adaptor(tokens), tokens[..., perm])


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_a_dropped_attention_or_mlp_block_is_written_as_onnxruntime_runs_it(form, vit_onnx, tmp_path):
    """The written file computes what the fx graph does without the block (and not what the
    original does); it has one attention (Softmax) or one MLP (Erf of the GELU) less. Weights that
    do not require grad (a recovered model) make nn.MultiheadAttention take its fused fast path,
    which no exporter writes: the export must not."""
    model = gp.load(small_vit(), input_shape=SHAPE) if form == "torch" else gp.load(vit_onnx)
    x = torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    full = gp.save(model, tmp_path / "full.onnx")
    for name, op in [("encoder.layers.encoder_layer_1.self_attention", "Softmax"),
                     ("encoder.layers.encoder_layer_0.mlp", "Erf")]:
        dropped = gp.drop_blocks(model, [name])
        for p in dropped.graph_module.parameters():
            p.requires_grad_(False)
        path = gp.save(dropped, tmp_path / "dropped.onnx")
        expected, written = dropped.run(x).numpy(), _ort(path, x)
        assert np.abs(written - expected).max() < 1e-4 * np.abs(expected).max()
        assert np.abs(written - _ort(full, x)).max() > 0.1 * np.abs(expected).max()  # the block mattered
        count = [n.op_type for n in onnx.load(str(path)).graph.node].count
        assert count(op) == [n.op_type for n in onnx.load(str(full)).graph.node].count(op) - 1
        assert [b.name for b in gp.find_blocks(gp.load(path))] == \
            [b.name for b in gp.find_blocks(model) if b.name != name]


FAST_CONFIG = gp.OptimizeConfig(latency_cut=0.2, quantize="none", latency=LatencySettings(min_time_s=0.05, warmup_s=0.02),
                                recoverability=RecoverabilitySettings(iterations=5, batch_size=16),
                                refine=RefineSettings(max_evaluations=2, joint_iterations=5),
                                recovery=RecoverySettings(iterations=4, batch_size=8), show_progress=False)


@pytest.mark.slow  # 10 s with one torch thread on a busy 2-core machine, 20 s with two
def test_optimize_drops_and_recovers_vit_sub_blocks(tmp_path):
    model = gp.load(small_vit(3), input_shape=SHAPE)
    result = gp.optimize(model, _unlabelled(40, 3), FAST_CONFIG)
    dropped = result.report["dropped"]
    assert dropped and all(n.endswith((".self_attention", ".mlp")) for n in dropped)
    assert result.report["recovery"]["final_loss"] is not None
    assert result.report["latency"]["selection_cut"] >= FAST_CONFIG.latency_cut
    assert len(gp.find_blocks(result.model)) == 6 - len(dropped)
    path = gp.save(result.model, tmp_path / "fast.onnx")
    x = torch.randn(2, *SHAPE[1:])
    expected = result.model.run(x).numpy()
    assert np.abs(_ort(path, x) - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.mark.slow  # 6 s with one torch thread on a busy 2-core machine, 35 s with two
def test_cli_optimizes_an_onnx_vit(cli, vit_onnx, tmp_path):
    import json

    data, out, report = tmp_path / "tiny.npz", tmp_path / "fast.onnx", tmp_path / "r.json"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    code, _, err = cli("optimize", vit_onnx, "--latency-cut", "0.2", "--quantize", "none", "--data", data, "-o", out, "--report", report,
                       "--min-time", "0.05", "--score-iterations", "5", "--refine-evaluations", "2",
                       "--joint-iterations", "5", "--recovery-iterations", "4", "--recovery-batch-size", "8",
                       "--no-cache", "--quiet")
    assert code == 0, err
    written = json.loads(report.read_text())
    assert written["dropped"] and written["latency"]["cut"] is not None
    assert len(gp.find_blocks(gp.load(out))) == 4 - len(written["dropped"])  # vit_onnx has 2 layers
    x = torch.randn(2, *SHAPE[1:])
    assert _ort(out, x).shape == (2, 10)
