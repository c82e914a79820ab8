"""Command-line options that fill the library's settings dataclasses, and ``--help`` in named groups.

An option that sets a setting says which field it fills (``fills="recovery.lr"``, a dotted path in
a :class:`Settings` tree) and takes its default from that field, so the command line and the
dataclasses cannot drift apart: :meth:`Settings.build` makes the settings objects from the parsed
values by the same paths, and :func:`fills_table` lists them (the test of that lives in
``tests/test_cli_options.py``). ``None`` from an option means "not given": the field keeps its
dataclass default.

Library errors name the Python parameter at fault (``GraphpruneError(..., parameter="recovery.lr")``);
:func:`translate` rewrites that name into the command's flag (``--recovery-lr``) from the same table.

Groups: a ten-line :meth:`GroupedCommand.format_options` rather than rich-click or
click-option-group. rich-click takes the groups from a separate dict keyed by command name (a
second list of every option, the drift this module removes) and brings rich's styled output to a
tool whose output is piped and parsed; click-option-group is small but has had few releases and
adds group-level constraints graphprune does not need. A group is one attribute on each option.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from contextlib import contextmanager
from types import SimpleNamespace

import click

from .errors import GraphpruneError, shown

# option groups: key (also the --config table name) -> title in --help, in --help order
GROUPS = {"input": "Model and input", "data": "Data", "latency": "Latency target", "scoring": "Scoring",
          "refinement": "Refinement", "recovery": "Recovery", "pipeline": "Pipeline", "output": "Output"}
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class GroupedOption(click.Option):
    """A click option with a ``--help`` group and the settings fields it fills (``to_field``: how
    its value becomes the field's, e.g. ``--quiet`` -> ``show_progress = not quiet``)."""

    def __init__(self, *args, group: str | None = None, fills: str | tuple[str, ...] = (), to_field=None, **kwargs):
        super().__init__(*args, **kwargs)
        if group is not None and group not in GROUPS:
            raise ValueError(f"unknown option group {group!r}")
        self.group = group
        self.fills = (fills,) if isinstance(fills, str) else tuple(fills)
        self.to_field = to_field or (lambda value: value)


class GroupedArgument(click.Argument):
    """A click argument with help, listed in ``--help`` under its group."""

    def __init__(self, *args, group: str | None = None, help: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group, self.help = group, help

    def get_help_record(self, ctx):
        return (self.human_readable_name, self.help) if self.help else None


def flag(param: click.Parameter) -> str:
    """How a user writes the parameter: its longest option name (``--output``), or ``MODEL``."""
    return max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name


def config_key(param: click.Parameter) -> str:
    """The parameter's ``--config`` key: the long option name without dashes, or the argument's name."""
    return flag(param).lstrip("-") if isinstance(param, click.Option) else param.name


def group_of(param: click.Parameter) -> str:
    return getattr(param, "group", None) or "input"


class GroupedCommand(click.Command):
    """``--help`` lists parameters under their group's title (ungrouped ones under "Options")."""

    def format_arguments(self, ctx, formatter) -> None:  # click >= 8.5 lists arguments apart; ours are in groups
        pass

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in sorted(self.get_params(ctx), key=lambda p: list(GROUPS).index(p.group)
                            if getattr(p, "group", None) else len(GROUPS)):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(GROUPS.get(getattr(param, "group", None), "Options"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def subcommand(name: str, help: str, short_help: str | None = None):
    """A graphprune subcommand: ``run(args)`` gets the parsed values as attributes and returns the exit
    status; a :class:`GraphpruneError` it raises has its parameter name replaced by the flag."""
    def decorate(run):
        @functools.wraps(run)
        def callback(**values):
            try:
                return run(SimpleNamespace(**values))
            except GraphpruneError as exc:
                raise translate(exc, flag_names(click.get_current_context().command.params))
        return click.command(name, cls=GroupedCommand, help=help, short_help=short_help,
                             context_settings=CONTEXT)(callback)
    return decorate


# ---- value types --------------------------------------------------------------------------------

class _Worded:
    """A click range that fails like graphprune's other messages: ``must be a positive integer, got '0'``."""

    def __init__(self, wording: str, **bounds):
        super().__init__(**bounds)
        self.wording = wording

    def convert(self, value, param, ctx):
        try:
            number = super().convert(value, param, ctx)
        except click.BadParameter:
            number = math.nan
        if not math.isfinite(number):  # nan passes every comparison a range makes
            self.fail(f"must be {self.wording}, got '{shown(value)}'", param, ctx)
        return number


class IntRange(_Worded, click.IntRange):
    name = "integer"


class FloatRange(_Worded, click.FloatRange):
    name = "number"


POSITIVE_INT = IntRange("a positive integer", min=1)
COUNT = IntRange("0 or more", min=0)
POSITIVE = FloatRange("a positive number", min=0, min_open=True)
NON_NEGATIVE = FloatRange("0 or more", min=0)
FRACTION = FloatRange("between 0 and 1 (exclusive)", min=0, max=1, min_open=True, max_open=True)
SHARE = FloatRange("above 0 and at most 1", min=0, max=1, min_open=True)
SEED = IntRange("an integer from 0 to 2**32 - 1", min=0, max=2**32 - 1)  # numpy's and torch's seeds alike
# onnxruntime starts this many threads per session: 100000 ran past 5 minutes before timing anything
THREADS = IntRange("an integer from 1 to 256", min=1, max=256)


class Numbers(click.ParamType):
    """``0.5,0.5,0.5`` -> a tuple (a config file's list comes as that text: :mod:`.cli_config`);
    shapes (``int``) also take ``1x3x32x32`` and must be positive."""

    def __init__(self, kind: type = float):
        self.kind, self.name = kind, "integers" if kind is int else "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).replace("x", ",") if self.kind is int else str(value)
        try:
            numbers = tuple(self.kind(v) for v in text.split(","))
        except ValueError:  # '' (an empty list) too
            self.fail(f"must be comma-separated {self.name}, got '{shown(value)}'", param, ctx)
        if not all(math.isfinite(n) for n in numbers):
            self.fail(f"must be finite numbers, got '{shown(value)}'", param, ctx)
        if self.kind is int and any(n <= 0 for n in numbers):
            self.fail(f"must be positive integers, got '{shown(value)}'", param, ctx)
        return numbers


class Names(click.ParamType):
    """``a, b,c`` -> ``("a", "b", "c")``, blanks left out; a list that names nothing (``,``) is refused,
    not taken for the option left out."""

    name = "names"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(part.strip() for part in str(value).split(",") if part.strip())
        if not names:
            self.fail(f"must name one or more {self.what}, got '{shown(value)}'", param, ctx)
        return names


# ---- settings trees -----------------------------------------------------------------------------

class Settings:
    """The settings one command fills: a main dataclass (paths without a prefix: ``recovery.lr``) and
    others under a name (``synthesis.steps``)."""

    def __init__(self, main: type, **others: type):
        self.roots = {"": main, **others}

    def split(self, path: str) -> tuple[str, str]:
        head, _, rest = path.partition(".")
        return (head, rest) if head in self.roots and head else ("", path)

    def default(self, path: str):
        """The dataclass default of the field at ``path`` (an error if there is no such field)."""
        root, rest = self.split(path)
        value = self.roots[root]
        for name in rest.split("."):
            fields = {f.name: f for f in dataclasses.fields(value)}
            if name not in fields:
                raise KeyError(f"{path}: no field {name!r} in {getattr(value, '__name__', type(value).__name__)}")
            field = fields[name]
            value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        return value

    def option(self, group: str, *decls: str, fills: str | tuple[str, ...] = (), **kwargs):
        """A click option in ``group`` whose default is the dataclass default of the (first) field it fills."""
        paths = (fills,) if isinstance(fills, str) else tuple(fills)
        if paths and not {"default", "to_field", "required"} & set(kwargs):  # to_field: the default is the flag's
            kwargs["default"] = self.default(paths[0])
        if isinstance(kwargs.get("default"), tuple):
            kwargs.setdefault("show_default", ",".join(map(str, kwargs["default"])))
        kwargs.setdefault("show_default", True)
        return click.option(*decls, cls=GroupedOption, group=group, fills=paths, **kwargs)

    def values(self, params, args, root: str = "") -> dict[str, object]:
        """``{path below root: value}`` from the parsed ``args`` of the options in ``params``."""
        out = {}
        for param in params:
            value = getattr(args, param.name, None)
            for path in getattr(param, "fills", ()):
                head, rest = self.split(path)
                if head == root and value is not None:
                    out[rest] = param.to_field(value)
        return out

    def build(self, params, args, root: str = "", *init):
        """The ``root`` dataclass (made from ``init``) with every field an option in ``params`` fills."""
        return apply(self.roots[root](*init), self.values(params, args, root))


def latency_options(settings: Settings, prefix: str, min_time: float | None = None):
    """--batch-size, --threads and --min-time, filling ``{prefix}batch_size`` etc. of ``settings``
    (``min_time``: the command's own default, where it is not the field's)."""
    extra = {} if min_time is None else {"default": min_time}
    return stack(
        settings.option("latency", "--batch-size", fills=prefix + "batch_size", type=POSITIVE_INT, metavar="N",
                        help="batch size the latency is measured at"),
        settings.option("latency", "--threads", fills=prefix + "threads", type=THREADS, metavar="N",
                        help="CPU threads the runtime uses"),
        settings.option("latency", "--min-time", fills=prefix + "min_time_s", type=POSITIVE, metavar="SECONDS",
                        help="time each model for at least this long", **extra))


def user_gave(*names: str) -> bool:
    """Whether the user set any of the options ``names`` (their parameter names), on the command
    line, in the environment or in a --config file, rather than leaving the dataclass default."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT) for name in names)


def stack(*decorators):
    """One decorator applying ``decorators`` as if written one above the other."""
    def decorate(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return decorate


def apply(obj, values: dict[str, object]):
    """``obj`` with the dotted ``values`` replaced, nested dataclasses copied (``{"recovery.lr": 1e-3}``)."""
    nested: dict[str, dict[str, object]] = {}
    flat = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    flat.update({name: apply(getattr(obj, name), inner) for name, inner in nested.items()})
    return dataclasses.replace(obj, **flat)


def fills_table(params) -> dict[str, tuple[str, ...]]:
    """``{"--recovery-lr": ("recovery.lr",), ...}``: what each option fills."""
    return {flag(p): p.fills for p in params if getattr(p, "fills", ())}


# ---- library parameter names -> flags -----------------------------------------------------------

def flag_names(params) -> dict[str, str]:
    """Library parameter names -> the flag that sets them: settings paths first, then click's names."""
    names = {path: flag(p) for p in params for path in getattr(p, "fills", ())}
    for p in params:
        if isinstance(p, click.Option):
            names.setdefault(p.name, flag(p))
    return names


def translate(exc: GraphpruneError, names: dict[str, str]) -> GraphpruneError:
    """``exc`` with the parameter its message names written as the flag (``recovery.lr`` ->
    ``--recovery-lr``); a bare field name (``min_time_s``) matches the one path it ends."""
    name = getattr(exc, "parameter", None)
    if not name:
        return exc
    target = names.get(name)
    if target is None:
        ends = {f for path, f in names.items() if path.endswith("." + name)}
        target = ends.pop() if len(ends) == 1 else None
    if target is not None:
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", target, str(exc))
        exc.args = (message, *exc.args[1:])
    return exc


@contextmanager
def flags_for(**names: str):
    """Within: a :class:`GraphpruneError` naming a library parameter of ``names`` names its flag
    instead (``flags_for(path="--eval-data")`` where one library call serves several options)."""
    try:
        yield
    except GraphpruneError as exc:
        raise translate(exc, names)
