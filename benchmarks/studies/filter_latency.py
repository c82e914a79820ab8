"""What filter pruning buys in latency on this CPU: the filter-l1 baseline's pruning (inner channels
of every block, L1 magnitude, Torch-Pruning) at several ratios, with and without ``round_to``
(channel counts kept multiples of 8 or 16, the SIMD widths of AVX2 and AVX-512), each model's
multiply-accumulates against its measured cut (onnxruntime, CPU, 1 thread, batch 1, interleaved
with the original, as every benchmark row measures it).

If latency followed MACs, the cut would track 1 - (MACs kept); if only unaligned channel counts
held pruning back, ``round_to`` would reach deeper cuts. Rows whose channel counts coincide are
the same model measured twice: their difference is the measurement's noise.

    python -m benchmarks.studies.filter_latency [--model resnet56]
        -> benchmarks/studies/results/filter_latency.json and .md
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import ensure_models
from benchmarks.compare_methods import LATENCY
from benchmarks.filter_l1 import l1_pruned_module
from benchmarks.studies.base import study_results_dir

RATIOS = (0.3, 0.5, 0.7, 0.84)
ROUND_TO = (None, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56", choices=("resnet20", "resnet56"))
    args = parser.parse_args()

    import torch
    import torch_pruning as tp

    import graphprune as gp
    from graphprune.backends.base import LatencySettings, get_backend
    from graphprune.backends.environment import cpu_name
    from graphprune.passes.measure_latency import measure_cut
    from graphprune.zoo import CifarResNet

    original = gp.load(ensure_models()[args.model])
    backend, settings = get_backend("onnxruntime"), LatencySettings(**LATENCY)
    original_run = backend.prepare(original, settings)
    example = torch.randn(1, 3, 32, 32)
    original_macs = tp.utils.count_ops_and_params(CifarResNet(int(args.model.removeprefix("resnet"))), example)[0]
    rows = []
    for round_to in ROUND_TO:
        for ratio in RATIOS:
            module = l1_pruned_module(args.model, ratio, round_to)
            macs = tp.utils.count_ops_and_params(module, example)[0]
            stages = (module.layer1, module.layer2, module.layer3)
            inner = [sorted({block.conv1.out_channels for block in stage}) for stage in stages]
            cut = measure_cut(backend, original, gp.load(module, input_shape=(1, 3, 32, 32)), settings,
                              original_run).cut
            rows.append(dict(round_to=round_to, ratio=ratio, inner_channels=inner,
                             macs_kept=macs / original_macs, cut=cut))
            print(rows[-1], flush=True)

    out = study_results_dir() / "filter_latency"
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "cpu": cpu_name(), "latency": LATENCY,
                                                    "rows": rows}, indent=1))
    lines = [f"# filter-l1 pruning: MACs against measured cut ({args.model}, {cpu_name()})", "",
             "`python -m benchmarks.studies.filter_latency`; onnxruntime, CPU, 1 thread, batch 1.", "",
             "| round_to | ratio | inner channels per stage | MACs kept | measured cut |", "|---|---|---|---|---|"]
    for r in rows:
        channels = " / ".join(",".join(map(str, c)) for c in r["inner_channels"])
        lines.append(f"| {r['round_to'] or '-'} | {r['ratio']} | {channels} | {r['macs_kept']:.2f} | {r['cut']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
