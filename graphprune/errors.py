"""User-facing errors.

Anything a user can cause (a broken file, an unknown block name, an impossible target) raises
:class:`GraphpruneError` with a message that fits on one line; the CLI prints it and exits non-zero.
Any other exception is a bug in graphprune and shows a traceback only with ``--debug``.

Library messages name the Python parameter at fault (``latency_cut``, ``recovery.lr``) and record it
in :attr:`GraphpruneError.parameter`; the CLI translates that name into its own flag
(``--latency-cut``, ``--recovery-lr``), so neither layer needs to know the other's spelling.
"""

from __future__ import annotations


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


def first_line(exc: BaseException) -> str:
    """A library's exception message on one line (its lines joined, at most 300 characters), for a
    one-line error: onnxruntime and onnx go on after a line break ("invalid dimensions for input:
    input for the following indices" then the indices; "input 'x' of node:" then the node)."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
