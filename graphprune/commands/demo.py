"""``graphprune demo``: the whole product on a built-in example, no user data, no download.

Trains :class:`graphprune.zoo.DigitsResNet` on scikit-learn's bundled 8x8 digits (upsampled to
16x16), exports it to ONNX, then runs ``optimize`` with a 22% latency cut using 100 training
images as the tiny set, and prints top-1 and latency before and after on the held-out digits.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from .. import zoo
from ..backends.base import LatencySettings
from ..cli_options import FRACTION, POSITIVE_INT, GroupedOption, Settings, subcommand
from ..data import Preprocessing, load_tiny_set
from ..formats.model_io import load, save
from ..optimize import OptimizeConfig, evaluate_result, optimize, write_result
from ..passes.recover import RecoverySettings
from ..report import format_summary

MEAN, STD = (0.3,), (0.4,)
SETTINGS = Settings(OptimizeConfig)


def digits_npz(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the digits as 16x16 grey uint8 .npz files: (train, test), a 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.8 * len(order))
    paths = folder / "digits_train.npz", folder / "digits_test.npz"
    np.savez_compressed(paths[0], images=pixels[order[:cut]], labels=labels[order[:cut]])
    np.savez_compressed(paths[1], images=pixels[order[cut:]], labels=labels[order[cut:]])
    return paths


def train_digits_model(train_npz: Path, epochs: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = zoo.DigitsResNet()
    data = load_tiny_set(train_npz, Preprocessing((1, 16, 16), MEAN, STD))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(data) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(data), (64,), generator=gen)
        loss = F.cross_entropy(model(data.images[index]), data.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


SETTINGS = Settings(OptimizeConfig)


@subcommand("demo", help="Train a small residual CNN on bundled digits and optimise it.")
@SETTINGS.option("latency", "--latency-cut", fills="latency_cut", type=FRACTION, help="fraction of latency to remove")
@click.option("--epochs", cls=GroupedOption, group="data", type=POSITIVE_INT, default=8, show_default=True,
              help="training epochs for the demo network")
@click.option("--workdir", cls=GroupedOption, group="output", type=click.Path(file_okay=False),
              help="keep the demo files here (default: a temporary folder)")
@click.option("--quiet", cls=GroupedOption, group="output", is_flag=True, help="no progress bars")
def command(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir) if args.workdir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        train_npz, test_npz = digits_npz(folder)
        print(f"training a residual CNN on {train_npz.name} ...")
        module = train_digits_model(train_npz, args.epochs)
        onnx_path = folder / "digits_resnet.onnx"
        save(load(module, input_shape=(1, 1, 16, 16)), onnx_path)
        original = load(onnx_path)
        prep = Preprocessing((1, 16, 16), MEAN, STD)
        tiny = load_tiny_set(train_npz, prep, num_samples=100, seed=0)
        config = OptimizeConfig(latency_cut=args.latency_cut, latency=LatencySettings(min_time_s=0.3),
                                recovery=RecoverySettings(iterations=300), show_progress=not args.quiet)
        print(f"optimising {onnx_path.name} for a {args.latency_cut:.0%} latency cut with 100 images ...")
        result = optimize(original, tiny, config)
        test = load_tiny_set(test_npz, prep)
        result.report["eval"] = evaluate_result(result, original, test)  # the int8 file where one was made
        out = write_result(result, folder / "digits_resnet.fast.onnx", str(onnx_path))
        result.report["output"] = str(out) if args.workdir else out.name + " (temporary; use --workdir to keep it)"
        print(format_summary(result.report))
        print(f"demo finished in {time.perf_counter() - start:.0f}s")
    return 0
