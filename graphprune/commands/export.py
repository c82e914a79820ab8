"""``graphprune export MODEL -o OUT``: write any loadable model as a verified .onnx or .pt2.

The way to turn ``zoo:cifar10_resnet56 --weights resnet56.th`` or ``torchvision:resnet50`` into the
ONNX file the other commands (and the benchmarks) take.
"""

from __future__ import annotations

from ..cli import add_model_arguments, load_model_from_args
from ..formats.model_io import save


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="write a model as verified .onnx or .pt2")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="output .onnx or .pt2")
    parser.set_defaults(run=run)


def run(args) -> int:
    path = save(load_model_from_args(args), args.output, source_path=args.model)
    print(f"wrote {path}")
    return 0
