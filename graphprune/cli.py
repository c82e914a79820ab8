"""The ``graphprune`` command line.

Each subcommand lives in :mod:`graphprune.commands` as a module with ``add_parser(subparsers)``
and ``run(args) -> int``. Errors a user can cause are :class:`~graphprune.errors.GraphpruneError`:
one line on stderr and a non-zero exit (2 for usage errors); a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import interrupts
from .errors import GraphpruneError, UsageError

COMMANDS = ("inspect", "drop", "export", "profile", "optimize", "demo")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too; keep it short)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="graphprune", description="Make trained residual networks faster with tiny data.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pipeline step")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    _quiet_libraries(debug)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.DEBUG if debug else (logging.INFO if args.verbose else logging.WARNING),
                            format="%(message)s", stream=sys.stderr)
        interrupts.install()
        status = int(args.run(args) or 0)
        interrupts.raise_if_interrupted()
        return status
    except GraphpruneError as exc:
        if debug:
            raise
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line unless --debug
        if debug:
            raise
        print(f"graphprune: internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
              " (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated integers, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers, got '{text}'")
    return dims


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --input-shape and --weights, shared by every command that loads a model."""
    parser.add_argument("model", help="an .onnx or .pt2 file, torchvision:<arch> or zoo:<arch>")
    parser.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (needed for dynamic spatial sizes)")
    parser.add_argument("--weights", help="state dict (.pth) for torchvision:/zoo: architectures (weights_only)")


def load_model_from_args(args):
    from .formats.model_io import load

    return load(args.model, input_shape=parse_shape(args.input_shape), weights=args.weights)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
