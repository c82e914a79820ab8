"""User-facing errors.

Anything a user can cause (a broken file, an unknown block name, an impossible target) raises
:class:`GraphpruneError` with a message that fits on one line; the CLI prints it and exits non-zero.
Any other exception is a bug in graphprune and shows a traceback only with ``--debug``.
"""


class GraphpruneError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 1


class UsageError(GraphpruneError):
    """A malformed command line (exit status 2, like argparse)."""

    exit_code = 2
