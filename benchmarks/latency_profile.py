"""How trustworthy and how costly are graphprune's latency profiles? (onnxruntime, CPU, 1 thread)

For each model (exported to ONNX with graphprune and loaded back, so onnxruntime sees the graph a
user would deploy) and batch size:

(a) spread: ``--spread-repeats`` whole-model profiles, each with a freshly built session (like
    running ``graphprune profile`` that many times). Reported: the medians, spread = max/min - 1,
    and the coefficient of variation (std/mean) of the medians. Target: spread within 2%.
(b) per-block: ``--per-block-repeats`` full per-block profiles (every block dropped alone, timed
    interleaved with the original). Reported: wall time of one profile (target for ResNet-56 at
    batch 1: under 2 minutes) and, with two repeats, how far each block's saved fraction moved
    between them (percentage points) - the noise of a single block's figure.
(c) additivity: ``--sets`` seeded random block sets; predicted cut = sum of the single-block saved
    fractions (first per-block profile), measured cut = ``measure_cut`` of the combined graph.
(d) a bar chart of per-block savings per model and batch size (PNG).

Measurement effort is what ``graphprune profile`` uses by default (``--min-time 1 --min-runs 10``,
3 warm-up runs / 0.1 s), except where one run takes seconds (ResNet-50 at batch 32: ~2.5 s a run
on 1 thread), which uses 1 warm-up run and 5 timed runs per model per measurement (see EFFORT).

Resumable: every finished measurement is appended to the results JSON at once (written atomically);
a rerun skips the rows it already has. The Markdown report and the PNGs are rebuilt from the JSON at
the end (``--report-only`` rebuilds them without measuring). The machine's load average is recorded
before and after every row: another busy process on this 2-core machine shows up there.

    python -m benchmarks.latency_profile                        # the full run (about 30-40 min)
    python -m benchmarks.latency_profile --quick                # minutes; writes latency_quick.*
    python -m benchmarks.latency_profile --models resnet56 --batch-sizes 1
    python -m benchmarks.latency_profile --redo-above 1.5        # re-measure rows taken under load
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import graphprune as gp
from graphprune.backends.base import LatencySettings, time_runs
from graphprune.backends.onnxruntime import OnnxRuntimeBackend
from graphprune.formats.model_io import atomic_write
from graphprune.passes import measure_block_latency, measure_cut

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / "cache"
MODELS = {"resnet56": "zoo:cifar10_resnet56", "resnet50": "torchvision:resnet50"}
DEFAULT = LatencySettings(threads=1, min_time_s=1.0, min_runs=10)  # = graphprune profile's defaults
QUICK = LatencySettings(threads=1, warmup_runs=2, warmup_s=0.05, min_time_s=0.2, min_runs=5)
# Runs that take seconds: the time bound is met by the run count alone; fewer warm-ups suffice.
EFFORT = {("resnet50", 32): dict(warmup_runs=1, warmup_s=0.0, min_time_s=0.0, min_runs=5)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56,resnet50", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--spread-repeats", type=int, default=5)
    parser.add_argument("--per-block-repeats", type=int, default=2, help="(1 for runs of seconds, see EFFORT)")
    parser.add_argument("--sets", type=int, default=10, help="random block sets for the additivity check")
    parser.add_argument("--quick", action="store_true", help="short measurements, 3 repeats, 3 sets, own files")
    parser.add_argument("--out", help="results JSON (default benchmarks/results/latency[_quick].json)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md and PNGs from the JSON")
    parser.add_argument("--redo-above", type=float, metavar="LOAD",
                        help="first forget rows measured while the 1-minute load average exceeded LOAD")
    args = parser.parse_args(argv)
    if args.quick:
        args.spread_repeats, args.per_block_repeats, args.sets = 3, 1, 3
    out = Path(args.out) if args.out else RESULTS / ("latency_quick.json" if args.quick else "latency.json")
    command = "python -m benchmarks.latency_profile " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if not args.report_only:
        run_all(args, out, command)
    write_report(out)
    return 0


# ---- measuring ----------------------------------------------------------------------------------

def run_all(args, out: Path, command: str) -> None:
    results = load_results(out)
    results["commands"] = results.get("commands", []) + [command]  # every run that added rows, in order
    if args.redo_above is not None:
        forget_loaded_rows(results, args.redo_above)
    backend = OnnxRuntimeBackend()
    for key in args.models.split(","):
        model = onnx_model(key)
        blocks = gp.find_blocks(model)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            settings = replace(QUICK if args.quick else DEFAULT, batch_size=batch, **EFFORT.get((key, batch), {}))
            results["machine"] = backend.describe(settings) | {"cores": os.cpu_count()}
            prefix = f"{key}/b{batch}"

            def row(name, measure):
                record(results, out, f"{prefix}/{name}", key, batch, settings, measure)

            for i in range(args.spread_repeats):
                row(f"spread/{i}", lambda: spread_row(backend, model, settings))
            repeats = 1 if (key, batch) in EFFORT else args.per_block_repeats
            for r in range(repeats):
                row(f"per_block/{r}", lambda: per_block_row(backend, model, blocks, settings))
            first = find_row(results, f"{prefix}/per_block/0")
            if first is None:
                continue
            singles = {b["name"]: b["saved_fraction"] for b in first["table"]["blocks"]}
            for j, chosen in enumerate(random_block_sets([b.name for b in blocks], args.sets, seed=batch)):
                row(f"additivity/{j}", lambda: additivity_row(backend, model, blocks, chosen, singles, settings))


def onnx_model(key: str):
    """The model as a user would deploy it: exported by graphprune, loaded back as ONNX (cached)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{key}.onnx"
    if not path.exists():
        gp.save(gp.load(MODELS[key]), path)
    return gp.load(path)


def spread_row(backend, model, settings) -> dict:
    start = time.perf_counter()
    run_once = backend.prepare(model, settings)  # a fresh session each time, as a new CLI run would
    prepare_s = time.perf_counter() - start
    stats = time_runs(run_once, settings)
    return {"latency_ms": stats.to_dict(), "prepare_s": prepare_s}


def per_block_row(backend, model, blocks, settings) -> dict:
    table = measure_block_latency(backend, model, settings, blocks, progress=False)
    return {"table": table.to_dict()}


def additivity_row(backend, model, blocks, chosen, singles, settings) -> dict:
    candidate = gp.drop_blocks(model, chosen, blocks)
    cut = measure_cut(backend, model, candidate, settings)
    predicted = sum(singles[name] for name in chosen)
    return {"blocks": chosen, "predicted_cut": predicted, "measured_cut": cut.cut,
            "error": predicted - cut.cut, **cut.to_dict()}


def random_block_sets(names: list[str], count: int, seed: int) -> list[list[str]]:
    """``count`` sets of 2 .. n/2 blocks, the same for a given seed whatever was measured before."""
    rng = random.Random(seed)
    sets = []
    for _ in range(count):
        size = rng.randint(2, max(2, len(names) // 2))
        sets.append(sorted(rng.sample(names, size), key=names.index))
    return sets


def record(results: dict, out: Path, row_id: str, model: str, batch: int, settings, measure) -> None:
    if find_row(results, row_id) is not None:
        return
    load_before, start = os.getloadavg(), time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {row_id} (load {load_before[0]:.2f})", flush=True)
    body = measure()
    wall = time.perf_counter() - start
    results["rows"].append({"id": row_id, "model": model, "batch_size": batch, "kind": row_id.split("/")[2],
                            "settings": settings.to_dict(), "wall_s": wall, "load_before": list(load_before),
                            "load_after": list(os.getloadavg()), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            **body})
    save_results(results, out)
    print(f"    done in {wall:.1f}s", flush=True)


def forget_loaded_rows(results: dict, limit: float) -> None:
    """Drop rows measured under load above ``limit`` (and the additivity rows whose predictions
    came from a dropped first per-block profile), so that a rerun measures them again."""
    loaded = {r["id"] for r in results["rows"] if max(r["load_before"][0], r["load_after"][0]) > limit}
    stale = {row_id.rsplit("/", 2)[0] for row_id in loaded if row_id.endswith("per_block/0")}
    before = len(results["rows"])
    results["rows"] = [r for r in results["rows"] if r["id"] not in loaded
                       and not (r["kind"] == "additivity" and r["id"].rsplit("/", 2)[0] in stale)]
    print(f"forgot {before - len(results['rows'])} rows ({len(loaded)} measured above load {limit:g})", flush=True)


def load_results(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {"rows": []}


def save_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    atomic_write(out, lambda tmp: tmp.write_text(text))


def find_row(results: dict, row_id: str) -> dict | None:
    return next((r for r in results["rows"] if r["id"] == row_id), None)


# ---- reporting ------------------------------------------------------------------------------------

def write_report(out: Path) -> None:
    results = load_results(out)
    rows = results["rows"]
    groups = list(dict.fromkeys((r["model"], r["batch_size"]) for r in rows))
    machine = results.get("machine", {})
    loads = [r["load_before"][0] for r in rows] + [r["load_after"][0] for r in rows]
    dates = sorted(r["finished"] for r in rows) or ["-"]
    lines = [f"# Latency profiling: noise, additivity, cost ({out.name})", "",
             "Produced by " + " then ".join(f"`{c}`" for c in results.get("commands", ["?"]))
             + f" (resumable; a rerun measures only missing rows). Rows finished {dates[0]} to {dates[-1]}.", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; onnxruntime "
             f"{machine.get('versions', {}).get('onnxruntime', '?')} {', '.join(machine.get('providers', []))}, "
             f"1 thread (intra-op 1, inter-op 1, sequential, ORT_ENABLE_ALL); torch "
             f"{machine.get('versions', {}).get('torch', '?')}, onnx {machine.get('versions', {}).get('onnx', '?')}.",
             f"1-minute load average during the run: {min(loads, default=0):.2f} .. {max(loads, default=0):.2f} "
             "(per row in the JSON; on 2 cores anything above ~1 means another process competed for the CPU).", ""]
    lines += spread_section(rows, groups) + per_block_section(rows, groups) + additivity_section(rows, groups)
    lines += ["## (d) Per-block savings", ""]
    for model, batch in groups:
        if find_row(results, f"{model}/b{batch}/per_block/0") is not None:
            chart = out.parent / f"{out.stem}_blocks_{model}_b{batch}.png"
            plot_blocks(results, model, batch, chart)
            lines.append(f"![{model} batch {batch}]({chart.name})")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _rows(rows, model, batch, kind):
    return [r for r in rows if r["model"] == model and r["batch_size"] == batch and r["kind"] == kind]


def _effort(settings: dict) -> str:
    return f"{settings['min_runs']} runs / {settings['min_time_s']:g} s"


def spread_section(rows, groups) -> list[str]:
    lines = ["## (a) Run-to-run spread of the whole-model median", "",
             "Each profile builds a fresh session, warms up, then times until the run and time minimums are met.", "",
             "| model | batch | effort per profile | medians (ms) | spread max/min-1 | CV | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for model, batch in groups:
        found = _rows(rows, model, batch, "spread")
        if not found:
            continue
        medians = [r["latency_ms"]["median"] for r in found]
        spread = max(medians) / min(medians) - 1
        cv = statistics.pstdev(medians) / statistics.fmean(medians)
        load = max(max(r["load_before"][0], r["load_after"][0]) for r in found)
        shown = ", ".join(f"{m:.3f}" for m in medians)
        lines.append(f"| {model} | {batch} | {_effort(found[0]['settings'])} | {shown} "
                     f"| {100 * spread:.2f}% | {100 * cv:.2f}% | max {load:.2f} |")
    return lines + [""]


def per_block_section(rows, groups) -> list[str]:
    lines = ["## (b) Per-block profile: cost and repeatability", "",
             "Wall time of one full per-block profile (one candidate per block, each timed interleaved with the "
             "original). Repeatability: |saved fraction in profile 2 - profile 1| per block, in percentage points.", "",
             "| model | batch | blocks | effort per model per pair | wall time (s) | mean single saving | "
             "repeat diff mean / max (pp) | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
    for model, batch in groups:
        found = _rows(rows, model, batch, "per_block")
        if not found:
            continue
        fractions = [[b["saved_fraction"] for b in r["table"]["blocks"]] for r in found]
        repeat = "n/a (1 profile)"
        if len(fractions) > 1:
            diffs = [abs(a - b) * 100 for a, b in zip(fractions[0], fractions[1])]
            repeat = f"{statistics.fmean(diffs):.2f} / {max(diffs):.2f}"
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in found)
        load = max(max(r["load_before"][0], r["load_after"][0]) for r in found)
        lines.append(f"| {model} | {batch} | {len(fractions[0])} | {_effort(found[0]['settings'])} | {walls} | "
                     f"{100 * statistics.fmean(fractions[0]):.2f}% | {repeat} | max {load:.2f} |")
    return lines + [""]


def additivity_section(rows, groups) -> list[str]:
    lines = ["## (c) Additivity: sum of single-block savings vs the measured cut of the combination", "",
             "| model | batch | blocks dropped | predicted cut | measured cut | predicted - measured (pp) |",
             "|---|---|---|---|---|---|"]
    summary = []
    for model, batch in groups:
        found = _rows(rows, model, batch, "additivity")
        for r in found:
            lines.append(f"| {model} | {batch} | {len(r['blocks'])} | {100 * r['predicted_cut']:.1f}% | "
                         f"{100 * r['measured_cut']:.1f}% | {100 * r['error']:+.1f} |")
        if found:
            errors = [100 * r["error"] for r in found]
            relative = [abs(r["error"]) / r["measured_cut"] * 100 for r in found if r["measured_cut"] > 0]
            magnitudes = [abs(e) for e in errors]
            summary.append(f"- {model} batch {batch}: mean error {statistics.fmean(errors):+.2f} pp, mean |error| "
                           f"{statistics.fmean(magnitudes):.2f} pp, max |error| {max(magnitudes):.2f} pp"
                           + (f", mean |error| / measured cut {statistics.fmean(relative):.1f}%" if relative else ""))
    return lines + [""] + summary + [""]


def plot_blocks(results: dict, model: str, batch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [r for r in results["rows"] if r["model"] == model and r["batch_size"] == batch
                and r["kind"] == "per_block"]
    names = [b["name"] for b in profiles[0]["table"]["blocks"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.6))
    width = 0.8 / len(profiles)
    for k, profile in enumerate(profiles):
        values = [100 * b["saved_fraction"] for b in profile["table"]["blocks"]]
        ax.bar([i + (k - (len(profiles) - 1) / 2) * width for i in range(len(names))], values, width,
               label=f"profile {k + 1}")
    original = profiles[0]["table"]["latency_ms"]["median"]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("latency saved by dropping it alone (%)")
    ax.set_title(f"{model}, batch {batch}, onnxruntime CPU 1 thread (original median {original:.2f} ms)", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    if len(profiles) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
