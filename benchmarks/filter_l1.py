"""The filter-l1 baseline of ``compare_methods``: the inner channels of every block of a pretrained
CIFAR ResNet pruned by L1 magnitude (Torch-Pruning, the ``bench`` extra), at the smallest ratio whose
measured cut reaches the target. ``benchmarks.studies.filter_latency`` measures what that pruning buys.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import CACHE, WEIGHTS


def filter_model_path(model: str, ratio: float) -> Path:
    """Where ``filter_pruned`` keeps ``model`` with its inner channels pruned at ``ratio``."""
    return CACHE / f"filter_{model}_{ratio:.4f}.onnx"


def l1_pruned_module(model: str, ratio: float, round_to: int | None = None):
    """The pretrained CIFAR ResNet ``model`` (a torch module) with the inner channels of every block
    (each block's first conv) pruned at ``ratio`` by L1 magnitude, Torch-Pruning's MagnitudePruner;
    ``round_to`` keeps channel counts multiples of it."""
    import torch
    import torch_pruning as tp

    from graphprune.formats.io_torch import load_state_dict_file
    from graphprune.zoo import CifarResNet

    module = CifarResNet(int(model.removeprefix("resnet")))
    load_state_dict_file(module, WEIGHTS[model])
    module.eval()
    blocks = [b for stage in (module.layer1, module.layer2, module.layer3) for b in stage]
    ignored = [module.conv1, module.linear] + [b.conv2 for b in blocks]
    tp.pruner.MagnitudePruner(module, torch.randn(1, 3, 32, 32), importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to).step()
    return module


def filter_pruned(bench, row: dict, margin: float):
    """Inner channels of every block pruned by L1 magnitude at the smallest ratio (bisection) whose
    measured cut reaches the target + ``margin``; returns the pruned model (ONNX) and its ratio.

    A ratio counts as reaching the target only when a second, independent measurement agrees
    (the smaller of the two cuts): thinned convs time far less steadily than dropped blocks. On an
    AMD EPYC (family 26) one ResNet-56 pruned at ratio 0.72 measured a cut above 0.405 once in the
    bisection and 0.29-0.31 in three later measurements, so a single lucky measurement let a 40%
    row through at a 29% cut."""
    from graphprune.passes.measure_latency import measure_cut

    gp = bench.gp
    original = bench.models[row["model"]]
    original_run = bench.backend.prepare(original, bench.latency)

    def prune(ratio: float):
        path = filter_model_path(row["model"], ratio)
        if not path.exists():
            gp.save(gp.load(l1_pruned_module(row["model"], ratio), input_shape=(1, 3, 32, 32)), path)
        return gp.load(path)

    def cut_of(pruned) -> float:
        first = measure_cut(bench.backend, original, pruned, bench.latency, original_run).cut
        if first < row["cut"] + margin:
            return first
        return min(first, measure_cut(bench.backend, original, pruned, bench.latency).cut)

    lo, hi, best = 0.0, 0.95, None
    for _ in range(7):
        mid = (lo + hi) / 2
        pruned = prune(mid)
        cut = cut_of(pruned)
        if cut >= row["cut"] + margin:
            hi, best = mid, (pruned, mid)
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"filter pruning cannot reach a {row['cut']:.0%} cut")
    return best
