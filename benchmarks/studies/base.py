"""Shared by the studies: their results folder and the command line of a resumable study."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import results_dir

STUDY_RESULTS = Path(__file__).resolve().parent / "results"


def study_results_dir() -> Path:
    """``benchmarks/studies/results`` (``$GRAPHPRUNE_STUDY_RESULTS_DIR`` overrides). The studies read the
    method comparison's rows from ``benchmarks.common.results_dir()``."""
    return results_dir(STUDY_RESULTS, "GRAPHPRUNE_STUDY_RESULTS_DIR")


def study_main(doc: str, run, report, run_options=None) -> None:
    """The command line of a resumable study: ``run`` (appends results, skips finished ones; its
    parser is given to ``run_options`` to add options) and ``report`` (writes its tables under
    ``benchmarks/studies/results``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.set_defaults(fn=run)
    if run_options:
        run_options(run_parser)
    sub.add_parser("report").set_defaults(fn=report)
    args = parser.parse_args()
    args.fn(args)
