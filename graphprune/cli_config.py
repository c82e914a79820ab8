"""``--config FILE``: a command's options from a TOML (``.toml``) or YAML (``.yaml``, ``.yml``) file.

Keys are the long option names without their dashes (``latency-cut``, ``score-iterations``,
``output``, ``data-free``) and ``model`` for the MODEL argument, either at the top level or inside a
table named after the option's ``--help`` group (``input``, ``data``, ``latency``, ``scoring``,
``refinement``, ``recovery``, ``output``)::

    model = "resnet56.onnx"
    latency-cut = 0.4
    data = "tiny/"
    output = "fast.onnx"

    [recovery]
    recovery-iterations = 4000
    recovery-lr = 3e-4

Values are checked exactly as the command line's are: a value of the right kind (a number, a
string, a list of numbers, true or false) becomes the text the command line would give
(``mean = [0.5, 0.5, 0.5]`` is ``--mean 0.5,0.5,0.5``), which the option's own click type then reads.
Flags on the command line override the file.
An unknown key, a key in another group's table, or a key given twice is a one-line error (exit 2).

Only a regular file of at most :data:`MAX_CONFIG_BYTES` is read, and no more than that: a FIFO
would block forever and ``/dev/zero`` never ends. A document nested too deeply for the parsers
(they recurse) is a one-line error too, and so is a YAML document whose aliases, written out, make
more than :data:`MAX_YAML_VALUES` values (433 bytes can stand for 10**9), a value that contains
itself, or a table with a key given twice (YAML keeps the last without a word; TOML refuses it): it
is refused from its parsed nodes, before any value is built.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from pathlib import Path

import click

from .cli_options import GroupedOption, Numbers, config_key, group_of
from .errors import UsageError, first_line, shown

CONFIG_META = "graphprune.config_file"  # ctx.meta: {"path": ..., "keys": [...]} of the file read
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB: a bigger file is a mistake (a log, a model), not options
MAX_YAML_VALUES = 10_000  # a config holds dozens of values, each a few at most


def config_option(f):
    """``--config FILE``, read before every other option (``is_eager``) into click's default map."""
    return click.option("--config", cls=GroupedOption, group="input", type=click.Path(exists=True, dir_okay=False),
                        is_eager=True, expose_value=False, callback=_load,
                        help="read options from this TOML or YAML file (keys: long option names without "
                             "dashes); flags given here override it")(f)


def config_file(ctx: click.Context) -> dict | None:
    """The path and keys of the ``--config`` file this command read, or ``None``."""
    return ctx.meta.get(CONFIG_META)


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    values = config_values(read_config(Path(value)), ctx.command.params, value)
    by_key = {config_key(p): p for p in ctx.command.params if p.expose_value}
    ctx.default_map = {**(ctx.default_map or {}), **{by_key[k].name: v for k, v in values.items()}}
    ctx.meta[CONFIG_META] = {"path": str(value), "keys": list(values)}


def read_config(path: Path) -> dict:
    """The file's top-level table (a one-line error for anything else)."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        parse, errors = tomllib.loads, (tomllib.TOMLDecodeError,)
    elif suffix in (".yaml", ".yml"):
        import yaml

        parse, errors = _load_yaml, (yaml.YAMLError,)
    else:
        raise UsageError(f"--config must be a .toml, .yaml or .yml file, got '{path}'")
    text = _read_text(path)
    try:
        doc = parse(text)
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply to read") from None
    except (*errors, ValueError) as exc:  # ValueError: _check_yaml_nodes, or an integer too long for int()
        raise UsageError(f"--config {path}: {first_line(exc)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(f"--config {path}: expected a table of option names, got {type(doc).__name__}")
    return doc


def _load_yaml(text: str):
    """``yaml.safe_load(text)``, checked on its parsed nodes (:func:`_check_yaml_nodes`) before any
    value is built from them."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_yaml_nodes(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_yaml_nodes(root) -> None:
    """A ValueError if ``root``, every alias written out, holds more than :data:`MAX_YAML_VALUES`
    nodes, a node holds itself, or a mapping has a key twice. Each node is visited once (an alias
    is the node it names, so a node's count is worked out once and reused), without recursion: the
    nesting may be deep."""
    counts: dict[int, int] = {}  # id(node) -> nodes in it, aliases written out
    open_nodes: set[int] = set()  # visited, not counted yet: the node on top and its ancestors
    stack = [root]
    while stack:
        node = stack[-1]
        if id(node) in counts:  # reached again through an alias
            stack.pop()
        elif id(node) not in open_nodes:
            open_nodes.add(id(node))
            _check_yaml_keys(node)
            for child in _yaml_children(node):
                if id(child) in open_nodes:
                    raise ValueError("a value contains itself (through an alias)")
                stack.append(child)
        else:
            stack.pop()
            open_nodes.discard(id(node))
            counts[id(node)] = 1 + sum(counts[id(child)] for child in _yaml_children(node))
            if counts[id(node)] > MAX_YAML_VALUES:
                raise ValueError(f"its aliases make more than {MAX_YAML_VALUES} values; a config holds a few options")


def _check_yaml_keys(node) -> None:
    """A ValueError if the mapping ``node`` writes a key twice (merged ``<<`` keys may repeat: the
    mapping's own win, as YAML's merge says)."""
    if node.id != "mapping":
        return
    seen = set()
    for key, _ in node.value:
        if key.id != "scalar" or key.tag == "tag:yaml.org,2002:merge":
            continue
        if (key.tag, key.value) in seen:
            raise ValueError(f"key '{shown(key.value)}' is given twice (line {key.start_mark.line + 1})")
        seen.add((key.tag, key.value))


def _yaml_children(node) -> list:
    if node.id == "sequence":
        return node.value
    if node.id == "mapping":
        return [part for pair in node.value for part in pair]
    return []


def _read_text(path: Path) -> str:
    """The text of ``path``, a regular file of at most :data:`MAX_CONFIG_BYTES` (read as UTF-8, as
    TOML requires and YAML's writers use)."""
    try:  # O_NONBLOCK: opening a FIFO for reading would wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"--config {path}: not a regular file")
        data = file.read(MAX_CONFIG_BYTES + 1)  # a file still growing stops here too
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; a config holds a few "
                         "options")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def config_values(doc: dict, params, path) -> dict[str, object]:
    """``{key: value}`` for every key of ``doc`` (group tables flattened), each a parameter of ``params``."""
    by_key = {config_key(p): p for p in params if p.expose_value}
    values: dict[str, object] = {}

    def add(key: str, written: str, value, group: str | None = None) -> None:
        param = by_key.get(key)
        if param is None or (group is not None and group_of(param) != group):
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"--config {path}: unknown key '{shown(written)}'{hint}")
        if key in values:
            raise UsageError(f"--config {path}: key '{key}' is given twice")
        if not _fits(param, value):
            quoted = f"'{shown(value)}'" if isinstance(value, str) else shown(value)
            raise UsageError(f"--config {path}: '{shown(written)}' must be {_wanted(param)}, got "
                             f"{type(value).__name__} {quoted}")
        values[key] = _as_command_line(value)

    groups = {group_of(p) for p in by_key.values()}
    for key, value in doc.items():
        if key in groups and key not in by_key and isinstance(value, dict):
            for inner, inner_value in value.items():
                add(str(inner), f"{key}.{inner}", inner_value, group=key)
        else:
            add(str(key), str(key), value)
    return values


def _fits(param: click.Parameter, value) -> bool:
    """Whether a config file's ``value`` has a type the parameter's converter reads (click's converters
    raise TypeError, not a usage error, on a list for a number or a number for a path)."""
    if isinstance(value, bool) or getattr(param, "is_flag", False):
        return isinstance(value, bool) and getattr(param, "is_flag", False)
    if isinstance(param.type, Numbers):
        items = value if isinstance(value, list) else [value]
        return all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in items)
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        return isinstance(value, (str, int, float))
    return isinstance(value, str)


def _as_command_line(value):
    """A config file's ``value`` (of a kind :func:`_fits` let through) as the command line would give
    it, for the option's type to read as it reads a flag's text: click's integer type truncates the
    float 1.5 (``seed = 1.5`` ran with seed 1; ``input-shape = [1, 3, 32.7, 32]`` read 32) but refuses
    the text '1.5'. A flag's true or false stays as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)  # str() of a float is its shortest exact text: 0.1 stays '0.1'


def _wanted(param: click.Parameter) -> str:
    if getattr(param, "is_flag", False):
        return "true or false"
    if isinstance(param.type, Numbers):
        return f"a list of {param.type.name}"
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        return "a number"
    return "a string"
