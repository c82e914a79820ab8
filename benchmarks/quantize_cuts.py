"""One latency target over block dropping and int8 (issue 28): CIFAR-10 ResNet-56 (ONNX) at cuts of
0.4 to 0.7, every row through the product's own ``optimize`` (Python API, the CLI's defaults).

Methods (one tiny set per seed: 500 images of train_lossless_4000, drawn with the seed):

* ``graphprune-int8``       ``quantize="auto"``: int8 planned on the original, blocks chosen by
                            recoverability per *quantised* latency saved, recovery, then int8
* ``block-influence-int8``  the same with Block Influence ranking the blocks (no refinement)
* ``blocks-only``           ``quantize="none"``: today's float pipeline
* ``int8-only``             no block step at all: the plan, the quantised original, its cut (one row
                            per seed; it "reaches" a cut where its measured cut does)

Each row: the cut of the written file measured by ``measure_result`` (interleaved with the float
original in one run, split into block dropping's share and quantisation's), top-1 of the written
file as onnxruntime runs it on test_lossless_1000 (exact pixels) and test.npz (10k JPEG), the
blocks dropped, the plan's choice, seconds per stage. Rows are appended to
``benchmarks/results/quantize_cuts.json`` as they finish (a rerun skips finished rows of this CPU);
per-block latency and recoverability are cached per model, tiny set and plan in
``benchmarks/cache/``, so the cuts of one seed share them.

    python -m benchmarks.quantize_cuts run [--only graphprune-int8] [--seeds 2021] [--cuts 0.6,0.7]
    python -m benchmarks.quantize_cuts report
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, DATA, ensure_models, results_dir, run_report_main
from benchmarks.compare_rows import this_machine
from benchmarks.rowfile import RowFile, report_fields, run_rows

METHODS = ("int8-only", "graphprune-int8", "block-influence-int8", "blocks-only")
SEEDS = (2021, 2022, 2023)
CUTS = (0.4, 0.5, 0.6, 0.7)
SAMPLES = 500
RESULTS_NAME = "quantize_cuts"


def grid(methods=METHODS, seeds=SEEDS, cuts=CUTS) -> list[dict]:
    """Seed by seed, the cheap rows first, so a partial run already compares methods on one tiny set."""
    rows = []
    for seed in seeds:
        if "int8-only" in methods:
            rows.append(dict(method="int8-only", model="resnet56", samples=SAMPLES, seed=seed, cut=None))
        for cut in cuts:
            rows += [dict(method=m, model="resnet56", samples=SAMPLES, seed=seed, cut=cut)
                     for m in methods if m != "int8-only"]
    return rows


def row_id(row: dict) -> str:
    return f"{row['method']}/{row['model']}/{row['samples']}/{row['seed']}/{row['cut']}"


ROWS = RowFile(RESULTS_NAME)


def config_for(row: dict):
    """The ``OptimizeConfig`` of a row: the CLI's defaults but for the method's settings."""
    from dataclasses import replace

    from graphprune.optimize import OptimizeConfig

    base = OptimizeConfig(latency_cut=row["cut"] or 0.05, seed=row["seed"], cache_dir=str(CACHE / "optimize"),
                          show_progress=False)
    method = row["method"]
    if method == "blocks-only":
        return replace(base, quantize="none")
    if method == "block-influence-int8":
        return replace(base, quantize="auto", recoverability=replace(base.recoverability, estimator="influence"))
    return replace(base, quantize="auto")


def pipeline_for(row: dict, config):
    """``int8-only``: the plan, the quantised original and its timing, no block step; else the default."""
    import graphprune as gp
    from graphprune.passes import MeasureResult, PlanQuantization, QuantizeResult

    if row["method"] == "int8-only":
        return [PlanQuantization("auto", config.quantization, config.recovery.device),
                QuantizeResult.from_config(config), MeasureResult()]
    return gp.default_pipeline(config)


def run_row(row: dict, tests: dict, original_path: str) -> dict:
    import onnx

    import graphprune as gp
    from graphprune.data import Preprocessing, load_tiny_set
    from graphprune.evaluate import evaluate, evaluate_onnx
    from graphprune.optimize import optimize, write_result

    model = gp.load(original_path)
    tiny = load_tiny_set(DATA["train"], Preprocessing((3, 32, 32)), row["samples"], row["seed"])
    config = config_for(row)
    start = time.perf_counter()
    result = optimize(model, tiny, config, pipeline_for(row, config))
    wall_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as work:
        proto = onnx.load(str(write_result(result, Path(work) / "out.onnx", original_path)))
    original_proto = onnx.load(original_path)
    report = result.report
    top1 = {name: evaluate_onnx(proto, test)["top1"] for name, test in tests.items()}
    top1_original = {name: evaluate_onnx(original_proto, test)["top1"] for name, test in tests.items()}
    # the recovered float model before int8 (what int8 costs on it); None where nothing was trained
    top1_float = ({name: evaluate(result.model, test)["top1"] for name, test in tests.items()}
                  if report["dropped"] and report.get("quantization", {}) and report["quantization"]["used"] else None)
    return {
        "id": row_id(row), **row, "cpu": this_machine(), **report_fields(report, wall_s),
        "top1": top1, "top1_original": top1_original, "top1_recovered_float": top1_float,
        "recovery_precision": report["settings"]["recovery"].get("precision", "float32"),
    }


def cmd_run(args) -> None:
    from graphprune.data import Preprocessing, load_tiny_set

    methods = tuple(args.only.split(",")) if args.only else METHODS
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else SEEDS
    cuts = tuple(float(c) for c in args.cuts.split(",")) if args.cuts else CUTS
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method {sorted(unknown)[0]}; choose from {', '.join(METHODS)}")
    done = ROWS.done(this_machine())
    todo = [r for r in grid(methods, seeds, cuts) if row_id(r) not in done]
    print(f"{len(todo)} rows to run on {this_machine()}", flush=True)
    prep = Preprocessing((3, 32, 32))
    tests = {"lossless1000": load_tiny_set(DATA["test_lossless"], prep),
             "jpeg10k": load_tiny_set(DATA["test_jpeg"], prep)}
    original_path = ensure_models()["resnet56"]
    run_rows(ROWS, todo, row_id, lambda row: run_row(row, tests, original_path), summary_line, this_machine())
    cmd_report(args)


def summary_line(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    split = row["cut_split"] or {}
    return (f"cut {row['cut_measured']:.3f} (float {split.get('float_only', row['cut_measured']):.3f}), "
            f"top-1 {100 * row['top1']['lossless1000']:.1f} (original {100 * row['top1_original']['lossless1000']:.1f}), "
            f"{len(row['dropped'])} blocks, {row['wall_s'] / 60:.1f} min")


def cmd_report(args) -> None:
    from benchmarks.quantize_report import write_report

    print(write_report(ROWS.load(), results_dir() / f"{RESULTS_NAME}.md"))


def run_options(parser) -> None:
    parser.add_argument("--only", help=f"comma-separated methods ({', '.join(METHODS)})")
    parser.add_argument("--seeds", help="comma-separated seeds (default 2021,2022,2023)")
    parser.add_argument("--cuts", help="comma-separated targets (default 0.4,0.5,0.6,0.7)")


if __name__ == "__main__":
    run_report_main(__doc__, cmd_run, cmd_report, run_options)
