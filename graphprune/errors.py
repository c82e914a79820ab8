"""User-facing errors.

Anything a user can cause (a broken file, an unknown block name, an impossible target) raises
:class:`GraphpruneError` with a message that fits on one line; the CLI prints it and exits non-zero.
Any other exception is a bug in graphprune and shows a traceback only with ``--debug``.

Library messages name the Python parameter at fault (``latency_cut``, ``recovery.lr``) and record it
in :attr:`GraphpruneError.parameter`; the CLI translates that name into its own flag
(``--latency-cut``, ``--recovery-lr``), so neither layer needs to know the other's spelling.

A value the user gave goes into a message through :func:`shown`, which bounds it: a message must
stay one short line whatever the value (a YAML alias bomb of 433 bytes is a list whose repr is
922 MB).
"""

from __future__ import annotations

import reprlib

VALUE_LIMIT = 80  # characters of a user's value quoted in a message
LINE_LIMIT = 1000  # characters of a whole error line: a safety net, no real message comes near it

# reprlib stops at a few items and levels, so a huge or deeply nested value costs what a short one does
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = VALUE_LIMIT
_SHORT_REPR.maxlevel = 3  # 6 items a level: 216 at most


class GraphpruneError(Exception):
    """A problem with the user's input, reported as one line.

    ``parameter``: the library parameter the message names (as written in the message), if any."""

    exit_code = 1

    def __init__(self, message: str = "", parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class UsageError(GraphpruneError):
    """A malformed command line (exit status 2, like argparse)."""

    exit_code = 2


def shown(value, limit: int = VALUE_LIMIT) -> str:
    """``value`` as a message quotes it: a string as it is, anything else as its (short) repr, its
    lines joined and cut to ``limit`` characters ("..." marks the cut)."""
    try:
        text = value if isinstance(value, str) else _SHORT_REPR.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = f"<{type(value).__name__} too long to show>"
    head = " ".join(text[:4 * limit].split())  # cut first: joining a 1 GB text's lines costs 1 GB
    if len(head) <= limit and len(text) <= 4 * limit:
        return head
    return head[:limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """A library's exception message on one line (its lines joined, at most 300 characters), for a
    one-line error: onnxruntime and onnx go on after a line break ("invalid dimensions for input:
    input for the following indices" then the indices; "input 'x' of node:" then the node)."""
    text = str(exc)
    return shown(text, 300) if text.strip() else type(exc).__name__
