"""Shared by the benchmark scripts: where the real data lives, the pretrained models as ONNX.

Data comes from ``$GRAPHPRUNE_DATA`` (default ``../shared/data``) and is never copied into the
project. The pretrained CIFAR ResNets are exported to ONNX once, by graphprune itself, into
``benchmarks/cache/`` (ignored by git): the benchmarks run on ONNX files as users would.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GRAPHPRUNE_DATA", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"
DATA = {
    "train": str(DATA_DIR / "cifar10" / "train_lossless_4000.npz"),
    "test_lossless": str(DATA_DIR / "cifar10" / "test_lossless_1000.npz"),
    "test_jpeg": str(DATA_DIR / "cifar10" / "test.npz"),
    "imagenet": str(DATA_DIR / "imagenet-samples"),
}
WEIGHTS = {
    "resnet20": DATA_DIR / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th",
    "resnet56": DATA_DIR / "cifar10-resnet-akamaster" / "resnet56-4bfd9763.th",
}


def results_dir(default: Path = RESULTS, env: str = "GRAPHPRUNE_RESULTS_DIR") -> Path:
    """``benchmarks/results``, made if missing (``$GRAPHPRUNE_RESULTS_DIR`` overrides, e.g. on a lent GPU
    machine); ``default`` and ``env`` name another results folder and its override."""
    path = Path(os.environ.get(env, default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_models() -> dict[str, str]:
    """``{"resnet20": path, "resnet56": path}`` of the pretrained models exported to ONNX."""
    import graphprune as gp

    CACHE.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, weights in WEIGHTS.items():
        path = CACHE / f"cifar10_{name}.onnx"
        if not path.exists():
            if not weights.exists():
                raise SystemExit(f"pretrained weights not found: {weights} (set GRAPHPRUNE_DATA)")
            gp.save(gp.load(f"zoo:cifar10_{name}", weights=str(weights)), path)
        paths[name] = str(path)
    return paths


def run_report_main(doc: str, run, report, run_options=None, **others) -> None:
    """The command line of a resumable benchmark: ``run`` (appends results, skips finished ones; its
    parser is given to ``run_options`` to add options), ``report`` (writes its tables from the
    results) and any ``others`` (subcommand name -> function of the parsed arguments)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in others.items():
        sub.add_parser(name).set_defaults(fn=fn)
    run_parser = sub.add_parser("run")
    run_parser.set_defaults(fn=run)
    if run_options:
        run_options(run_parser)
    sub.add_parser("report").set_defaults(fn=report)
    args = parser.parse_args()
    args.fn(args)
