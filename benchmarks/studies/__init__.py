"""One-off research studies behind graphprune's defaults (README, "Defaults, and the evidence behind
them"), with their results in ``benchmarks/studies/results/``. Run from the repository root, e.g.
``python -m benchmarks.studies.refine_study report`` (rebuilds its report from the committed results).
"""
