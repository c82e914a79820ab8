"""``python -m graphprune``: the command line."""

from .cli import entry

entry()
