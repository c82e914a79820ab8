"""``graphprune drop MODEL --blocks NAME[,NAME...] -o OUT``: write the model without those blocks."""

from __future__ import annotations

import click

from ..cli import load_model_from_args, model_options, output_option
from ..cli_options import GroupedOption, subcommand
from ..errors import UsageError
from ..formats.model_io import save
from ..passes import drop_blocks


@subcommand("drop", help="Drop named residual blocks and write the result.")
@model_options
@click.option("--blocks", cls=GroupedOption, group="input", required=True,
              help="comma-separated block names (see inspect)")
@output_option()
def command(args) -> int:
    names = [n for n in args.blocks.split(",") if n.strip()]
    if not names:
        raise UsageError("--blocks is empty")
    model = load_model_from_args(args)
    smaller = drop_blocks(model, names)
    path = save(smaller, args.output, source_path=args.model)
    print(f"dropped {len(names)} block(s): {', '.join(names)} -> {path}")
    return 0
