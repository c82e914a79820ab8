"""Does scoring's time limit (``passes/scoring_budget.py``) change the published budgeted rows?

For each model and the ``--time-budget`` its published rows ran under, scoring's share of that
budget (``SCORE_SHARE`` of the budget less ``LEFT_BEFORE`` seconds spent before scoring: a lower
bound on what is left then, so an upper bound on the risk), the probes' estimate of scoring every
block at the 50 steps asked, and the steps the limit gives. Where those are the 50 asked, the run
scores exactly as without the limit (``tests/test_time_budget.py``: a limit that fits leaves every
score equal), so its rows need no re-run.

Which result changes what: fewer than 50 steps for a published row means re-running it (or a
larger share); 50 means nothing to re-run.

    python -m benchmarks.studies.scoring_budget_check run
    python -m benchmarks.studies.scoring_budget_check report  # -> results/scoring_budget_check.md
"""

from __future__ import annotations

import json
import time

from benchmarks.common import run_report_main
from benchmarks.studies.base import study_results_dir

NAME = "scoring_budget_check"
CASES = {"resnet56": 600, "efficientnet_lite0": 2700}  # the budgets of the published rows
LEFT_BEFORE = 60  # seconds taken before scoring starts (loading, profiling; ResNet-56's were 36 s)


def _case(name: str):
    """(model, train, holdout) as optimize splits them for the published rows."""
    import graphprune as gp
    from graphprune.data import Preprocessing, load_tiny_set, split_holdout

    if name == "resnet56":
        from benchmarks.common import DATA, ensure_models

        model = gp.load(str(ensure_models()["resnet56"]))
        tiny = load_tiny_set(DATA["train"], Preprocessing((3, 32, 32)), num_samples=500, seed=2021)
    else:
        from benchmarks.real_models import MODELS, lite0_onnx, tiny_set

        model, tiny = gp.load(str(lite0_onnx())), tiny_set(MODELS[name])
    return (model, *split_holdout(tiny, 0.2, 16, 0))


def run(args) -> None:
    import graphprune as gp
    from graphprune.features import mimic_targets
    from graphprune.passes.recoverability import RecoverabilitySettings, _Context, _probe
    from graphprune.passes.scoring_budget import PROBE_STEPS, SCORE_SHARE, affordable_iterations

    rows = []
    for name, budget in CASES.items():
        model, train, holdout = _case(name)
        blocks = gp.find_blocks(model)
        settings = RecoverabilitySettings()
        started = time.perf_counter()
        context = _Context(model, blocks, train, holdout, mimic_targets(model, None), settings)
        probed = []

        def probe_of(block):
            return lambda steps: probed.append(_probe(context, block, steps)) or probed[-1]

        share = SCORE_SHARE * (budget - LEFT_BEFORE)
        steps = affordable_iterations(settings.iterations, len(blocks), share - (time.perf_counter() - started),
                                      [probe_of(blocks[0]), probe_of(blocks[-1])])
        total, in_steps = (sum(p[i] for p in probed) / len(probed) for i in (0, 1))
        estimate = len(blocks) * (total - in_steps + settings.iterations * in_steps / PROBE_STEPS)
        rows.append({"model": name, "budget_s": budget, "share_s": share, "blocks": len(blocks),
                     "estimate_s": estimate, "steps": steps, "asked": settings.iterations,
                     "probe_s": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
    (study_results_dir() / f"{NAME}.json").write_text(json.dumps(
        {"rows": rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    report(args)


def report(args) -> None:
    result = json.loads((study_results_dir() / f"{NAME}.json").read_text())
    lines = [f"# {NAME}: scoring's time limit against the published budgeted rows", "",
             f"Command: `python -m benchmarks.studies.{NAME} run` (finished {result['finished']}).", "",
             "| model | --time-budget | scoring's share | blocks | estimate at the steps asked | steps given |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['budget_s']} s | {r['share_s']:.0f} s | {r['blocks']} | "
                     f"{r['estimate_s']:.0f} s | {r['steps']} of {r['asked']} |")
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_report_main(__doc__, run, report)
