"""The ``graphprune`` command line: one click group.

Each subcommand is a module in :mod:`graphprune.commands` whose ``command`` is a click command
(made with :func:`graphprune.cli_options.subcommand`); modules are imported only when their command
runs or its help is shown. Options that set library settings are declared in
:mod:`graphprune.cli_options`; ``optimize --config FILE`` in :mod:`graphprune.cli_config`.

Errors: anything a user can cause prints one line, ``graphprune: error: ...``, on stderr (the
value it quotes, and the line itself, cut short: :func:`graphprune.errors.shown`). A
:class:`~graphprune.errors.GraphpruneError` exits 1 (:class:`~graphprune.errors.UsageError`: 2); a
malformed command line (click's usage errors: missing or unknown option, bad value or choice, no
such command) exits 2, its message on one line as argparse worded it. Any other exception is a bug:
``graphprune: internal error: ...``, exit 1. Tracebacks only with ``--debug``. Ctrl-C:
``graphprune: interrupted``, exit 130; one that arrives once the command has returned (its output
written and reported, the interpreter shutting down, which takes a second with torch loaded) is
ignored: the work is whole, and the exit status says so (:func:`entry`). ``graphprune`` alone prints
the help and exits 2.

Shell completion (click's): ``eval "$(_GRAPHPRUNE_COMPLETE=bash_source graphprune)"`` in
``~/.bashrc`` (``zsh_source`` for zsh, ``fish_source`` for fish).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from . import interrupts
from .cli_options import CONTEXT, GroupedArgument, GroupedOption, Numbers, config_key, flag, stack
from .errors import LINE_LIMIT, GraphpruneError, first_line, shown

COMMANDS = ("inspect", "drop", "export", "profile", "optimize", "demo")


class _Group(click.Group):
    """The subcommands, in :data:`COMMANDS` order, each imported when it is needed."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f".commands.{name}", __package__).command

    def resolve_command(self, ctx, args):
        name = args[0]
        if name not in COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            raise click.UsageError(f"argument COMMAND: invalid choice: '{name}' (choose from {', '.join(COMMANDS)})",
                                   ctx)
        return super().resolve_command(ctx, args)


@click.group("graphprune", cls=_Group, invoke_without_command=True, context_settings=CONTEXT,
             help="Make trained residual networks faster with tiny data.")
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
@click.option("-v", "--verbose", is_flag=True, help="log each pipeline step")
@click.pass_context
def graphprune(ctx: click.Context, debug: bool, verbose: bool) -> None:
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(2)
    logging.basicConfig(level=logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING),
                        format="%(message)s", stream=sys.stderr)
    interrupts.install()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    _quiet_libraries(debug)
    try:
        status = graphprune.main(argv, prog_name="graphprune", standalone_mode=False)
        interrupts.raise_if_interrupted()
        return int(status or 0)
    except click.ClickException as exc:  # the command line itself: click's messages, made one line
        if debug:
            raise
        print(f"graphprune: error: {usage_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except GraphpruneError as exc:
        if debug:
            raise
        print(f"graphprune: error: {shown(str(exc), LINE_LIMIT)}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, click.Abort):  # click turns a KeyboardInterrupt into Abort
        word, status = interrupts.interrupted_by()
        print(f"graphprune: {word}", file=sys.stderr)
        return status
    except Exception as exc:  # a bug: say so in one line unless --debug
        if debug:
            raise
        print(f"graphprune: internal error: {type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"
              " (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script (and ``python -m graphprune``): :func:`main`, then exit with its status. A
    Ctrl-C after the command returned would otherwise kill the interpreter while it shuts down,
    with no message and a signal's status, after the output was written and announced."""
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


def usage_line(exc: click.ClickException) -> str:
    """One line for a click error, worded as argparse did (``argument --threads: must be ...``)."""
    param = getattr(exc, "param", None)
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.MissingParameter) and param is not None:
        text = f"the following arguments are required: {flag(param)}"
    elif isinstance(exc, click.BadParameter) and param is not None:
        from_file = ctx is not None and ctx.get_parameter_source(param.name) == ParameterSource.DEFAULT_MAP
        text = f"{f'--config key {config_key(param)!r}' if from_file else f'argument {flag(param)}'}: {exc.message}"
    else:
        text = exc.format_message()
    return shown(text, LINE_LIMIT)  # click's own messages quote the value too ("Path '...' does not exist")


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")


def _complete_files(ctx, param, incomplete):
    return [click.shell_completion.CompletionItem(incomplete, type="file")]


# MODEL, --input-shape and --weights, shared by every command that loads a model
model_options = stack(
    click.argument("model", cls=GroupedArgument, group="input", shell_complete=_complete_files,
                   help="an .onnx or .pt2 file, torchvision:<arch> or zoo:<arch>"),
    click.option("--input-shape", cls=GroupedOption, group="input", type=Numbers(int), metavar="SHAPE",
                 help="input shape, e.g. 1,3,224,224 (needed for dynamic spatial sizes)"),
    click.option("--weights", cls=GroupedOption, group="input", type=click.Path(exists=True, dir_okay=False),
                 help="state dict (.pth) for torchvision:/zoo: architectures (weights_only)"))


class OutputPath(click.Path):
    """A file path ending in .onnx or .pt2: another suffix is a malformed command line (exit 2) in
    every command alike (the writer checks it again, and the folder, for the Python API)."""

    def __init__(self):
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if Path(str(value)).suffix.lower() not in (".onnx", ".pt2"):
            self.fail(f"must end in .onnx or .pt2, got '{shown(value)}'", param, ctx)
        return value


def output_option(help: str = "output .onnx or .pt2"):
    """-o/--output, required, ending in .onnx or .pt2 (the writer checks its folder)."""
    return click.option("-o", "--output", cls=GroupedOption, group="output", required=True, type=OutputPath(),
                        help=help)


def load_model_from_args(args):
    from .formats.model_io import load

    return load(args.model, input_shape=args.input_shape, weights=args.weights)


if __name__ == "__main__":  # pragma: no cover
    entry()
