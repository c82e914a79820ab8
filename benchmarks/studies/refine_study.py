"""Does the joint recoverability of a block set predict how well the set recovers? (refine_selection)

``set_study`` recovered 23 different 40% block sets of ResNet-56 (seeds 2021-2022, 500 images,
the default recovery) and measured their top-1. Here every one of those sets gets

* its *joint* recoverability J(S): all its blocks dropped at once, adaptors fitted around every gap
  together, held-out feature MSE (``graphprune.passes.recoverability.set_scorer``, graphprune's
  default estimator settings), and
* the *additive* guess the greedy selection relies on: the sum of its blocks' single-block
  recoverabilities (same settings),

and the report gives the Spearman correlation of each with the sets' recovered top-1. Test labels
judge the sets here only; graphprune never sees them. Resumable: each set's J is appended to
``benchmarks/studies/results/refine_study.jsonl`` and skipped when rerun.

    python -m benchmarks.studies.refine_study run        # about 10 s a set on this 2-core CPU
    python -m benchmarks.studies.refine_study report     # -> benchmarks/studies/results/refine_study.{json,md}
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import run_report_main
from benchmarks.studies.base import study_results_dir

SAMPLES = 500
EXTREME = ("stage1-all+2", "stage3-heavy")  # set_study's deliberately lopsided sets


def _set_rows() -> list[dict]:
    return json.loads((study_results_dir() / "set_study.json").read_text())["rows"]


def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def cmd_run(args) -> None:
    from benchmarks.compare_methods import Bench

    from graphprune.data import split_holdout
    from graphprune.optimize import OptimizeConfig
    from graphprune.passes.recoverability import set_scorer

    out = study_results_dir() / "refine_study.jsonl"
    done = _done(out)
    bench = Bench()
    model = bench.models["resnet56"]
    blocks = bench.gp.find_blocks(model)
    for seed in sorted({r["seed"] for r in _set_rows()}):
        settings = replace(OptimizeConfig().recoverability, seed=seed)
        tiny = bench._tiny(SAMPLES, seed)
        singles = bench.scores("resnet56", tiny, seed, settings)
        train, holdout = split_holdout(tiny, seed=seed)
        joint = set_scorer(model, blocks, train, holdout, settings)
        for row in (r for r in _set_rows() if r["seed"] == seed):
            key = f"{seed}/{row['set']}"
            if key in done:
                continue
            start = time.perf_counter()
            record = {"id": key, "seed": seed, "set": row["set"], "blocks": row["blocks"],
                      "per_stage": row["per_stage"], "joint": joint(row["blocks"]),
                      "sum_of_singles": sum(singles[b] for b in row["blocks"]),
                      "top1_lossless1000": row["top1_lossless1000"], "top1_jpeg10k": row["top1_jpeg10k"],
                      "seconds": time.perf_counter() - start, "settings": settings.__dict__}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{key}: J {record['joint']:.4f}  sum {record['sum_of_singles']:.4f}  "
                  f"top-1 {100 * row['top1_lossless1000']:.1f}", flush=True)


def cmd_report(args) -> None:
    from scipy.stats import spearmanr

    records = list(_done(study_results_dir() / "refine_study.jsonl").values())
    lines = ["# Joint recoverability vs the additive guess (ResNet-56, 40% block sets)", "",
             "Command: `python -m benchmarks.studies.refine_study run && python -m benchmarks.studies.refine_study report`. "
             "Sets and their recovered top-1: `set_study.md` (recovered on an H100, 500 images, default "
             "recovery). J and single scores: graphprune's default estimator (PRACTISE adaptors, 50 Adam "
             "steps, lr 3e-3) on the held-out 20% of the same tiny set, computed on this 2-core CPU.", "",
             "Spearman correlation with the recovered top-1 (higher error should mean lower top-1; "
             "shown as a positive number when it does):", "",
             "| seed | sets | joint J vs lossless1000 | sum of singles vs lossless1000 | J vs jpeg10k | "
             "sum vs jpeg10k | J / sum vs lossless1000 without the two lopsided sets |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for seed in sorted({r["seed"] for r in records}):
        rows = [r for r in records if r["seed"] == seed]
        balanced = [r for r in rows if r["set"] not in EXTREME]
        rho = {f"{kind}/{test}": float(spearmanr([r[kind] for r in rows], [-r[f"top1_{test}"] for r in rows]).statistic)
               for kind in ("joint", "sum_of_singles") for test in ("lossless1000", "jpeg10k")}
        rho.update({f"{kind}/lossless1000/balanced": float(spearmanr(
            [r[kind] for r in balanced], [-r["top1_lossless1000"] for r in balanced]).statistic)
            for kind in ("joint", "sum_of_singles")})
        summary[str(seed)] = {"sets": len(rows), "spearman": rho}
        lines.append(f"| {seed} | {len(rows)} | {rho['joint/lossless1000']:.2f} | "
                     f"{rho['sum_of_singles/lossless1000']:.2f} | {rho['joint/jpeg10k']:.2f} | "
                     f"{rho['sum_of_singles/jpeg10k']:.2f} | {rho['joint/lossless1000/balanced']:.2f} / "
                     f"{rho['sum_of_singles/lossless1000/balanced']:.2f} |")
    lines += ["", "| seed | set | blocks per stage | joint J | sum of singles | top-1 lossless1000 | top-1 jpeg10k |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["seed"], r["joint"])):
        lines.append(f"| {r['seed']} | {r['set']} | {'-'.join(map(str, r['per_stage']))} | {r['joint']:.4f} | "
                     f"{r['sum_of_singles']:.4f} | {100 * r['top1_lossless1000']:.1f} | {100 * r['top1_jpeg10k']:.2f} |")
    (study_results_dir() / "refine_study.md").write_text("\n".join(lines) + "\n")
    (study_results_dir() / "refine_study.json").write_text(json.dumps({"summary": summary, "sets": records}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    run_report_main(__doc__, cmd_run, cmd_report)
