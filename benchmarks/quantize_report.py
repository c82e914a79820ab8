"""The report of ``benchmarks.quantize_cuts``: one table per target cut (mean over seeds of each
method's measured cut, its split between block dropping and int8, top-1 on both test sets, blocks
dropped, wall time), paired differences against the original, and the headline: the largest target
at which graphprune's ``--quantize auto`` stays within 1 point of the original on test_lossless_1000.

Rows of one CPU are compared (the CPU of most rows); a target counts as reached by a row when its
measured cut is at least the target minus ``REACH_TOLERANCE`` (timing noise of the final
measurement: selection itself stops only once its own measurement reaches the target + 0.005).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

REACH_TOLERANCE = 0.01
WITHIN = 0.01  # the headline's bound: within 1 point of the original's top-1


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _fmt(value, scale=100.0, digits=1):
    return "-" if value is None else f"{scale * value:.{digits}f}"


def reference_cpu(rows: list[dict]) -> str | None:
    counts = Counter(r["cpu"] for r in rows)
    return counts.most_common(1)[0][0] if counts else None


def reaches(row: dict, cut: float) -> bool:
    return "error" not in row and row["cut_measured"] >= cut - REACH_TOLERANCE


def cell_rows(rows: list[dict], method: str, cut) -> list[dict]:
    if method == "int8-only":
        return [r for r in rows if r["method"] == method]
    return [r for r in rows if r["method"] == method and r["cut"] == cut]


def headline(rows: list[dict], method: str = "graphprune-int8") -> dict:
    """The largest target whose every seed's row reaches it and stays within ``WITHIN`` of the original."""
    best = None
    for cut in sorted({r["cut"] for r in rows if r["method"] == method}):
        cell = cell_rows(rows, method, cut)
        ok = cell and all(reaches(r, cut) and r["top1_original"]["lossless1000"] - r["top1"]["lossless1000"] <= WITHIN
                          for r in cell)
        if ok:
            best = {"cut": cut, "seeds": len(cell)}
    return best or {"cut": None, "seeds": 0}


def write_report(all_rows: list[dict], path: Path) -> str:
    cpu = reference_cpu(all_rows)
    rows = [r for r in all_rows if r["cpu"] == cpu]
    methods = [m for m in ("graphprune-int8", "block-influence-int8", "int8-only", "blocks-only")
               if any(r["method"] == m for r in rows)]
    cuts = sorted({r["cut"] for r in rows if r["cut"] is not None})
    ok = [r for r in rows if "error" not in r]
    original = _mean([r["top1_original"]["lossless1000"] for r in ok])
    original_jpeg = _mean([r["top1_original"]["jpeg10k"] for r in ok])
    lines = ["# One latency target over block dropping and int8: CIFAR-10 ResNet-56", "",
             f"Made by `python -m benchmarks.quantize_cuts run` then `report` ({time.strftime('%Y-%m-%d')}); CPU: "
             f"{cpu}; onnxruntime CPU, 1 thread, batch 1; 500 tiny images of train_lossless_4000 per seed. "
             f"Original top-1: {_fmt(original, digits=2)} (test_lossless_1000), {_fmt(original_jpeg, digits=2)} (test.npz). "
             "Every cut is the written file's, measured by the run's `measure_result` (interleaved with the "
             "float original); *float* is block dropping's share of it (the recovered float model in the same run), "
             "the rest is int8's. Top-1 of the written file as onnxruntime runs it. Mean over the seeds shown.", ""]
    lines += ["| target | method | seeds | reached | cut | of which float | top-1 lossless | vs original | top-1 jpeg "
              "| blocks | wall min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cut in cuts:
        for method in methods:
            cell = cell_rows(rows, method, cut)
            if not cell:
                continue
            done = [r for r in cell if "error" not in r]
            reached = sum(reaches(r, cut) for r in cell)
            if not done:
                lines.append(f"| {cut:.2f} | {method} | {len(cell)} | 0 | - | - | - | - | - | - | - |")
                continue
            split = [(r["cut_split"] or {}).get("float_only", r["cut_measured"]) for r in done]
            diff = _mean([r["top1"]["lossless1000"] - r["top1_original"]["lossless1000"] for r in done])
            lines.append(
                f"| {cut:.2f} | {method} | {len(cell)} | {reached} | {_fmt(_mean([r['cut_measured'] for r in done]))} "
                f"| {_fmt(_mean(split))} | {_fmt(_mean([r['top1']['lossless1000'] for r in done]), digits=2)} "
                f"| {_fmt(diff, digits=2)} | {_fmt(_mean([r['top1']['jpeg10k'] for r in done]), digits=2)} "
                f"| {_mean([len(r['dropped']) for r in done]):.1f} | {_mean([r['wall_s'] for r in done]) / 60:.1f} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Rows that stopped with an error (recorded, not retried):", ""]
        lines += [f"- `{r['id']}`: {r['error']}" for r in errors]
    best = headline(rows)
    lines += ["", f"**Headline**: the largest target at which graphprune-int8 stays within {WITHIN * 100:.0f} point of "
              f"the original on every seed run: "
              + (f"**{best['cut']:.2f}** ({best['seeds']} seeds)." if best["cut"] is not None else "none yet."), ""]
    per_seed = defaultdict(list)
    for r in ok:
        per_seed[(r["method"], r["cut"])].append(r)
    lines += ["Per row (seed: cut measured / float share, top-1 lossless, blocks dropped, plan):", ""]
    for (method, cut), cell in sorted(per_seed.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        for r in sorted(cell, key=lambda r: r["seed"]):
            split = (r["cut_split"] or {}).get("float_only", r["cut_measured"])
            plan = (r.get("plan") or {}).get("label", "float")
            lines.append(f"- {method} {cut} seed {r['seed']}: {_fmt(r['cut_measured'])} / {_fmt(split)}, "
                         f"{_fmt(r['top1']['lossless1000'], digits=1)}, {len(r['dropped'])} blocks, {plan}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
