"""``graphprune profile MODEL``: the model's latency on a target and, with ``--per-block``, what
dropping each residual block alone would save there.

The whole model is timed in rounds until ``--min-runs`` runs and ``--min-time`` seconds are both
reached, after a warm-up; the median is the figure to quote (p10/p90 show the spread). Per-block
savings time each candidate interleaved with the original (see
:mod:`graphprune.passes.measure_latency`), ``--min-time`` seconds for each of the two.
"""

from __future__ import annotations

import json
import sys

import click

from ..backends.base import LatencySettings, compare_interleaved, get_backend
from ..cli import load_model_from_args, model_options
from ..cli_options import POSITIVE_INT, GroupedOption, Settings, latency_options, subcommand
from ..optimize import OptimizeConfig
from ..passes import FindBlocks, measure_block_latency

SETTINGS = Settings(LatencySettings)
# profile times one model (or each block against it) once, for a figure to quote, so it spends twice
# what optimize spends on each of the dozens of candidates it measures while selecting.
MIN_TIME_S = 2 * SETTINGS.default("min_time_s")


@subcommand("profile", help="Measure latency on a target, optionally what each block costs.")
@model_options
@click.option("--backend", cls=GroupedOption, group="latency", default=OptimizeConfig.backend, show_default=True,
              help="onnxruntime or torch")
@SETTINGS.option("latency", "--device", fills="device", help="cpu or cuda")
@latency_options(SETTINGS, prefix="", min_time=MIN_TIME_S)
@SETTINGS.option("latency", "--min-runs", fills="min_runs", type=POSITIVE_INT, metavar="N",
                 help="and at least this many runs")
@click.option("--per-block", cls=GroupedOption, group="latency", is_flag=True,
              help="also measure what dropping each block saves")
@click.option("--json", cls=GroupedOption, group="output", is_flag=True, help="print JSON to stdout")
@click.option("--no-progress", cls=GroupedOption, group="output", is_flag=True,
              help="no progress bar (it is shown only on a terminal)")
def command(args) -> int:
    backend = get_backend(args.backend)
    settings = SETTINGS.build(click.get_current_context().command.params, args)
    model = load_model_from_args(args)
    progress = False if args.no_progress else None
    if args.per_block:
        blocks = FindBlocks()(model).value
        table = measure_block_latency(backend, model, settings, blocks, progress=progress)
        original, rows, info = table.original, table.rows, table.backend_info
    else:
        original, rows, info = _measure_whole(backend, model, settings, progress), [], backend.describe(settings)
    if args.json:
        print(json.dumps({"model": args.model, "latency_ms": original.to_dict(),
                          "blocks": [{"name": r.name, "saved_ms": r.saved_ms, "saved_fraction": r.saved_fraction}
                                     for r in rows],
                          "settings": {**settings.to_dict(), **info}}, indent=2))
        return 0
    print(format_profile(args.model, original, rows, info, per_block=args.per_block))
    return 0


def _measure_whole(backend, model, settings: LatencySettings, progress: bool | None):
    """The model alone: the same rounds as an interleaved run of one model, with a progress bar."""
    from tqdm import tqdm

    run_once = backend.prepare(model, settings)
    with tqdm(desc="measuring", unit="run", file=sys.stderr, leave=False,
              disable=None if progress is None else not progress) as bar:
        return compare_interleaved([run_once], settings, on_round=lambda _: bar.update())[0]


def format_profile(model_name: str, original, rows, info: dict, per_block: bool) -> str:
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    where = f"{info['backend']} on {info['device']}"
    if info.get("providers"):
        where += f" ({', '.join(info['providers'])})"
    lines = [f"{model_name}: {where}, {threads}, batch {info['batch_size']}",
             f"latency: median {original.median_ms:.3f} ms (p10 {original.p10_ms:.3f}, p90 {original.p90_ms:.3f}, "
             f"{original.runs} runs)"]
    if not per_block:
        return "\n".join(lines)
    if not rows:
        return "\n".join(lines + ["no residual blocks found (nothing graphprune can drop)"])
    table = [("block", "saved ms", "saved %", "without it ms")]
    table += [(r.name, f"{r.saved_ms:.3f}", f"{100 * r.saved_fraction:.1f}", f"{r.candidate_ms:.3f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    body = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in table]
    body.insert(1, "  ".join("-" * w for w in widths))
    total = 100 * sum(r.saved_fraction for r in rows)
    body.append(f"{len(rows)} blocks, each dropped alone and timed interleaved with the original; "
                f"single-block savings sum to {total:.1f}% (they do not add up exactly)")
    return "\n".join(lines + [""] + body)
