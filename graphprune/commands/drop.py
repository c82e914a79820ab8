"""``graphprune drop MODEL --blocks NAME[,NAME...] -o OUT``: write the model without those blocks."""

from __future__ import annotations

from ..cli import add_model_arguments, load_model_from_args
from ..errors import UsageError
from ..formats.model_io import save
from ..passes import drop_blocks


def add_parser(sub) -> None:
    parser = sub.add_parser("drop", help="drop named residual blocks and write the result")
    add_model_arguments(parser)
    parser.add_argument("--blocks", required=True, help="comma-separated block names (see inspect)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx or .pt2")
    parser.set_defaults(run=run)


def run(args) -> int:
    names = [n for n in args.blocks.split(",") if n.strip()]
    if not names:
        raise UsageError("--blocks is empty")
    model = load_model_from_args(args)
    smaller = drop_blocks(model, names)
    path = save(smaller, args.output, source_path=args.model)
    print(f"dropped {len(names)} block(s): {', '.join(names)} -> {path}")
    return 0
