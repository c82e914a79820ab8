"""Where a measured cut's noise comes from: the same pair of onnxruntime sessions timed again, a
fresh session of the candidate each time, or fresh sessions of both (each as ``measure_cut`` times a
pair: interleaved, onnxruntime CPU, 1 thread, batch 1).

A cut is 1 - candidate / original, each a median of runs interleaved in one measurement. The
question: does each prepared session come with a speed of its own (where its buffers landed), so
that cuts timed against one prepared original share its offset and timing again cannot average it
away? Two first runs of 6 repeats disagreed (sd 0.16, 0.24, 0.65 points in the order below, from an
uncommitted script timing the same three ways, then 0.29, 0.18, 0.13 from this study with
``--repeats 6``, its rows since replaced); the recorded run of 12 says no: the three ways spread alike (EfficientNet-Lite0 at 192 px:
sd 0.70, 0.48, 0.50 points), in episodes (a run of 20.3-21.0% among 21.5-22.8%). So the noise lies
in the machine's moments, not in the sessions, and ``choose_resolution`` times a size near its
goal again with the same prepared original, judging by the mean.

    python -m benchmarks.studies.session_noise [--model efficientnet_lite0|resnet56] [--side 192]
        [--repeats 6] -> benchmarks/studies/results/session_noise.json and .md (rows per model)
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.studies.base import study_results_dir

WAYS = ("same sessions", "fresh candidate", "fresh both")


def model_path(name: str):
    if name == "efficientnet_lite0":
        from benchmarks.real_models import lite0_onnx
        return lite0_onnx()
    from benchmarks.common import ensure_models
    return ensure_models()[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=("efficientnet_lite0", "resnet56"))
    parser.add_argument("--side", type=int, default=192, help="the candidate: the model behind a resize to this side")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    import graphprune as gp
    from graphprune.backends.base import LatencySettings, compare_interleaved, get_backend, latency_cut
    from graphprune.backends.environment import cpu_name
    from graphprune.passes.resize_input import resize_input, scale_for

    original = gp.load(model_path(args.model))
    candidate = resize_input(original, scale_for(int(original.analysis_shape()[-2]), args.side))
    backend, settings = get_backend("onnxruntime"), LatencySettings()
    kept_original, kept_candidate = backend.prepare(original, settings), backend.prepare(candidate, settings)

    def cut(way: str) -> float:
        original_run = kept_original if way != "fresh both" else backend.prepare(original, settings)
        candidate_run = kept_candidate if way == "same sessions" else backend.prepare(candidate, settings)
        return latency_cut(*compare_interleaved([original_run, candidate_run], settings))

    cuts = {way: [] for way in WAYS}
    for _ in range(args.repeats):  # the three ways in turn, so drift of the machine hits each alike
        for way in WAYS:
            cuts[way].append(cut(way))
    row = {"model": args.model, "side": args.side, "cpu": cpu_name(),
           "ways": {way: {"cuts": values, "mean": statistics.fmean(values), "sd": statistics.stdev(values)}
                    for way, values in cuts.items()}}
    print(json.dumps(row, indent=1))

    out = study_results_dir() / "session_noise"
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    rows = [r for r in rows if (r["model"], r["side"]) != (args.model, args.side)] + [row]
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# Where a measured cut's noise comes from", "",
             "`python -m benchmarks.studies.session_noise --model M --side S`; the model behind a resize to S px "
             "against the original, onnxruntime CPU 1 thread batch 1, each cut one interleaved measurement "
             f"(0.5 s a model); the three ways in turn, {args.repeats} times.", "",
             "| model | side | CPU | way | cuts (%) | mean | sd |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for way, v in r["ways"].items():
            lines.append(f"| {r['model']} | {r['side']} | {r['cpu']} | {way} | "
                         f"{', '.join(f'{100 * c:.1f}' for c in v['cuts'])} | {100 * v['mean']:.2f} | {100 * v['sd']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
