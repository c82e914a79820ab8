"""Shared by the studies: their results folder."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import results_dir

STUDY_RESULTS = Path(__file__).resolve().parent / "results"


def study_results_dir() -> Path:
    """``benchmarks/studies/results`` (``$GRAPHPRUNE_STUDY_RESULTS_DIR`` overrides). The studies read the
    method comparison's rows from ``benchmarks.common.results_dir()``."""
    return results_dir(STUDY_RESULTS, "GRAPHPRUNE_STUDY_RESULTS_DIR")
