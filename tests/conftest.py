"""Shared fixtures: real data location, cached ONNX exports of torchvision models, CLI runner."""

from __future__ import annotations

import io
import os
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: avoid oversubscription

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GRAPHPRUNE_DATA", ROOT.parent / "shared" / "data"))

# torchvision architectures the block finder must get right, with the input size used in tests
# and the number of residual blocks each has.
TORCHVISION_MODELS = {
    "resnet18": ((2, 3, 64, 64), 8),
    "resnet50": ((2, 3, 64, 64), 16),
    "mobilenet_v2": ((2, 3, 64, 64), 10),
    "mobilenet_v3_large": ((2, 3, 64, 64), 10),
    "efficientnet_b0": ((2, 3, 64, 64), 9),
    "regnet_x_400mf": ((2, 3, 64, 64), 22),
    "convnext_tiny": ((2, 3, 64, 64), 18),
    "shufflenet_v2_x0_5": ((2, 3, 64, 64), 13),  # channel-split residuals: cat(x1, f(x2))
    "vit_b_16": ((1, 3, 224, 224), 24),
    "swin_t": ((1, 3, 224, 224), 24),
}


def models_with_slow(*slow: str) -> list:
    """TORCHVISION_MODELS' names for ``parametrize``, those in ``slow`` marked slow (10 s or more a
    test on a shared 2-core machine, ``--durations``): ``make test-fast`` leaves them out."""
    assert set(slow) <= set(TORCHVISION_MODELS), slow
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in TORCHVISION_MODELS]


def data_path(*parts) -> Path:
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set GRAPHPRUNE_DATA)")
    return path


def torchvision_module(name: str) -> torch.nn.Module:
    import torchvision

    return seeded_module(lambda: torchvision.models.get_model(name, weights=None))


def seeded_module(make) -> torch.nn.Module:
    """``make()`` built under seed 0, in eval mode, its norms perturbed (``randomise_norms``)."""
    torch.manual_seed(0)
    module = make().eval()
    randomise_norms(module)
    return module


def randomise_norms(module: torch.nn.Module) -> None:
    """Random weights make zero biases and unit norms; perturb them so no value is special."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            for name in ("bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))


def export_onnx(module: torch.nn.Module, shape, path: Path, opset: int = 14) -> Path:
    """Export like a user would: TorchScript exporter, named input/output, dynamic batch."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, *shape[1:]),), str(path), opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def optimized_file_agrees(model, images: torch.Tensor, config, path: Path):
    """``optimize`` on ``images`` (unlabelled) drops something and recovers; the file it writes to
    ``path`` runs in onnxruntime as the optimised graph does. Returns the result."""
    import numpy as np
    import onnxruntime as ort

    import graphprune as gp
    from graphprune.data import TinySet

    result = gp.optimize(model, TinySet(images, -torch.ones(len(images), dtype=torch.long)), config)
    assert result.report["dropped"] and result.report["recovery"]["final_loss"] is not None
    gp.save(result.model, path)
    x = images[:3]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    written = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = result.model.run(x).numpy()
    assert np.abs(written - expected).max() < 1e-4 * np.abs(expected).max()
    return result


def plain_cnn_onnx(path: Path) -> Path:
    """A 32 px classifier with no residual block and no layer that keeps its shape (nothing to drop:
    int8 is its only lever), as ONNX."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    return export_onnx(net.eval(), (1, 3, 32, 32), path)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def torchvision_onnx(onnx_dir):
    """Cached ONNX exports: ``torchvision_onnx("resnet18") -> Path``."""
    def get(name: str) -> Path:
        path = onnx_dir / f"{name}.onnx"
        if not path.exists():
            export_onnx(torchvision_module(name), TORCHVISION_MODELS[name][0], path)
        return path
    return get


@pytest.fixture()
def cli(capsys):
    """Run the CLI in-process: ``cli("inspect", path) -> (exit_code, stdout, stderr)``."""
    from graphprune.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def pytest_configure(config):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))


class StemBlockHead(torch.nn.Module):
    """conv stem -> ``between`` -> one residual block named ``block`` -> mean -> linear; ``before``
    prepares the input (both identities here: subclasses give them a meaning)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(8, 8, 3, padding=1))
        self.fc = torch.nn.Linear(8, classes)

    def before(self, x):
        return x

    def between(self, y):
        return y

    def forward(self, x):
        y = self.between(self.stem(self.before(x)))
        y = torch.relu(y + self.block(y))
        return self.fc(y.mean((2, 3)))
