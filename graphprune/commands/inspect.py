"""``graphprune inspect MODEL``: the residual blocks, as a table or JSON, and whether the network
can run at a lower resolution inside the graph (``optimize --lever resolution``)."""

from __future__ import annotations

import json

import click

from ..cli import load_model_from_args, model_options
from ..cli_options import GroupedOption, subcommand
from ..graph_stats import model_macs
from ..passes.find_blocks import find_blocks, split_layers
from ..passes.resize_input import why_not_smaller


@subcommand("inspect", help="List the residual blocks of a model.")
@model_options
@click.option("--json", cls=GroupedOption, group="output", is_flag=True, help="print JSON to stdout")
def command(args) -> int:
    model = load_model_from_args(args)
    blocks, layers = split_layers(find_blocks(model, layers=True))  # one search for both
    total = model_macs(model) if blocks else 0
    refused = why_not_smaller(model)
    if args.json:
        print(json.dumps({"model": args.model, "input_shape": list(model.analysis_shape()),
                          "model_macs": total, "blocks": [b.summary() for b in blocks],
                          "layers_outside_blocks": [b.summary() for b in layers],
                          "runs_at_lower_resolution": refused is None, "lower_resolution_refused": refused}, indent=2))
        return 0
    print(format_block_table(blocks, total) if blocks else
          f"{args.model}: no residual blocks found (nothing graphprune can drop)")
    if layers:
        print(f"{len(layers)} layers outside the blocks keep their shape ({sum(b.macs for b in layers) / 1e6:.2f} "
              "MMACs): optimize offers them too where the blocks cannot reach the target (--layers)")
    print("resolution: the network runs at a lower resolution inside the graph with its outputs' shapes, a "
          "detector's anchors aside (optimize --lever resolution)" if refused is None else
          f"resolution: no --lever resolution: {refused}")
    return 0


def format_block_table(blocks, total_macs: int) -> str:
    rows = [("block", "kind", "input", "output", "params", "MMACs", "% MACs")]
    for b in blocks:
        share = 100.0 * b.macs / total_macs if total_macs else 0.0
        rows.append((b.name, b.kind, _shape(b.input_shape), _shape(b.output_shape), f"{b.params:,}",
                     f"{b.macs / 1e6:.2f}", f"{share:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = "layers of a network without residual blocks" if all(b.kind == "layer" for b in blocks) else "residual blocks"
    lines.append(f"{len(blocks)} {what}; model total {total_macs / 1e6:.2f} MMACs")
    return "\n".join(lines)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"
