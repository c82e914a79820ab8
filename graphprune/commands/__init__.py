"""One module per ``graphprune`` subcommand (see :mod:`graphprune.cli`)."""
