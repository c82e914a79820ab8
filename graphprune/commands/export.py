"""``graphprune export MODEL -o OUT``: write any loadable model as a verified .onnx or .pt2.

The way to turn ``zoo:cifar10_resnet56 --weights resnet56.th`` or ``torchvision:resnet50`` into the
ONNX file the other commands (and the benchmarks) take.
"""

from __future__ import annotations

from ..cli import load_model_from_args, model_options, output_option
from ..cli_options import subcommand
from ..formats.model_io import save


@subcommand("export", help="Write a model as verified .onnx or .pt2.")
@model_options
@output_option()
def command(args) -> int:
    path = save(load_model_from_args(args), args.output, source_path=args.model)
    print(f"wrote {path}")
    return 0
