"""Which 40% block sets of ResNet-56 recover best? (Why graphprune ties Block Influence.)

At a 40% cut graphprune (recoverability / latency, 50 adaptor steps) and Block Influence choose the
same 11 blocks on seeds 2021 and 2022, so they tie. This study asks whether a *different* set would
recover better, i.e. whether there is anything for a better ranking to find: it recovers many
11-block sets (every ranking of the scoring study, stage-balanced and stage-heavy sets, seeded
random sets) with the same tiny set and recovery, and reports top-1 against the cut predicted by
the per-block latency table (block_latency_onnxruntime_cpu_1thread_b1.json). Test labels are
used only to judge the sets here, never to choose blocks in graphprune.

    python -m benchmarks.studies.set_study jobs            # -> .gpu/plan/set_jobs.json (recover jobs)
    python -m benchmarks.jobs .gpu/plan/set_jobs.json set_study.jsonl --device cuda --workers 12
    python -m benchmarks.studies.set_study report set_study.jsonl   # -> benchmarks/studies/results/set_study.{json,md}
    python -m benchmarks.studies.set_study report   # the same tables, rebuilt from the committed set_study.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from benchmarks.studies.base import study_results_dir

SIZE = 11  # blocks per set: what reaches a 40% measured cut on ResNet-56 (3.3-4.3% each)
STAGE1 = [f"layer1.{i}" for i in range(1, 9)]
STAGE2 = [f"layer2.{i}" for i in range(1, 9)]
STAGE3 = [f"layer3.{i}" for i in range(1, 9)]


def _saved_fraction() -> dict[str, float]:
    table = json.loads((study_results_dir() / "block_latency_onnxruntime_cpu_1thread_b1.json").read_text())["resnet56"]
    return {b["name"]: b["saved_fraction"] for b in table["blocks"]}


def _rankings(seed: int) -> dict[str, list[str]]:
    """Block orders (score / saved latency, ascending) of every estimator the scoring study ran."""
    saved = _saved_fraction()
    orders = {}
    for line in (study_results_dir() / "scoring_study.jsonl").read_text().splitlines():
        record = json.loads(line)
        job = record["job"]
        if job["kind"] != "score" or "resnet56" not in job["model"] or job["seed"] != seed or not record.get("ok"):
            continue
        scores = record["scores"]
        name = record["id"].split("/")[-1]
        orders[name] = sorted((n for n in scores if saved[n] > 0), key=lambda n: scores[n] / saved[n])
    return orders


def candidate_sets(seed: int) -> dict[str, list[str]]:
    orders = _rankings(seed)
    sets = {f"rank:{name}": order[:SIZE] for name, order in orders.items()}
    ref = orders.get("practise-1000") or orders["practise-50"]

    def best(pool, k):
        return [n for n in ref if n in pool][:k]

    sets["stage1-all+2"] = STAGE1 + best(STAGE2, SIZE - 8)
    sets["balanced-4-4-3"] = best(STAGE1, 4) + best(STAGE2, 4) + best(STAGE3, 3)
    sets["stage1-6+stage2-5"] = best(STAGE1, 6) + best(STAGE2, 5)
    sets["stage2-all+stage1-3"] = STAGE2 + best(STAGE1, 3)
    sets["stage3-heavy"] = best(STAGE3, 6) + best(STAGE1, 5)
    rng = random.Random(seed)
    for k in range(5):
        sets[f"random:{k}"] = sorted(rng.sample(STAGE1 + STAGE2 + STAGE3, SIZE))
    unique, seen = {}, set()
    for name, blocks in sets.items():  # identical sets are recovered once
        key = tuple(sorted(blocks))
        if key not in seen:
            seen.add(key)
            unique[name] = blocks
    return unique


def cmd_jobs(args) -> None:
    from benchmarks.common import ensure_models
    from benchmarks.device_rows import PLAN, job_recovery, staged_eval, staged_model, staged_train

    from graphprune.optimize import OptimizeConfig

    shared = {"kind": "recover", "model": staged_model(ensure_models()["resnet56"]), "data": staged_train(),
              "samples": 500, "recovery": job_recovery(OptimizeConfig().recovery), "eval": staged_eval()}
    jobs = [{"id": f"set/{seed}/{name}", "seed": seed, "drop": blocks, **shared}
            for seed in args.seeds for name, blocks in candidate_sets(seed).items()]
    out = PLAN / "set_jobs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jobs, indent=1))
    print(f"{len(jobs)} jobs -> {out}")


def _recovered_rows(results: Path) -> list[dict]:
    """The sets' rows from ``jobs``' result file (one JSON line per recovered set)."""
    saved = _saved_fraction()
    rows = []
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if not record.get("ok") or not record["id"].startswith("set/"):
            continue
        _, seed, name = record["id"].split("/", 2)
        blocks = record["job"]["drop"]
        rows.append({"seed": int(seed), "set": name, "blocks": sorted(blocks),
                     "per_stage": [sum(b.startswith(f"layer{s}.") for b in blocks) for s in (1, 2, 3)],
                     "predicted_cut": sum(saved[b] for b in blocks),
                     "top1_lossless1000": record["eval"]["lossless1000"]["after"],
                     "top1_jpeg10k": record["eval"]["jpeg10k"]["after"], "device": record.get("device")})
    return rows


def cmd_report(args) -> None:
    """The tables, from ``args.results`` (``jobs``' result file) or, without it, from the committed
    ``set_study.json``."""
    rows = _recovered_rows(Path(args.results)) if args.results else \
        json.loads((study_results_dir() / "set_study.json").read_text())["rows"]
    rows.sort(key=lambda r: (r["seed"], -r["top1_jpeg10k"]))
    description = __doc__.split("\n\n")[0]
    (study_results_dir() / "set_study.json").write_text(json.dumps({"description": description, "rows": rows}, indent=1))
    lines = ["# Which 40% block sets of ResNet-56 recover best?", "", __doc__.split("\n\n")[1], "",
             "Commands: see the header of `benchmarks/studies/set_study.py`. Recovered on: "
             f"{', '.join(sorted({str(r['device']) for r in rows}))} (default recovery: 2000 AdamW steps, 500 images).",
             "",
             "| seed | set | blocks per stage | predicted cut | top-1 lossless1000 | top-1 jpeg10k |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['set']} | {'-'.join(map(str, r['per_stage']))} | {r['predicted_cut']:.3f} | "
                     f"{100 * r['top1_lossless1000']:.1f} | {100 * r['top1_jpeg10k']:.2f} |")
    for seed in sorted({r["seed"] for r in rows}):
        jpeg = [100 * r["top1_jpeg10k"] for r in rows if r["seed"] == seed]
        lines.append(f"\nSeed {seed}: jpeg10k over {len(jpeg)} sets: best {max(jpeg):.2f}, median "
                     f"{statistics.median(jpeg):.2f}, worst {min(jpeg):.2f}.")
    (study_results_dir() / "set_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    jobs = sub.add_parser("jobs")
    jobs.add_argument("--seeds", type=int, nargs="+", default=[2021, 2022])
    jobs.set_defaults(fn=cmd_jobs)
    report = sub.add_parser("report")
    report.add_argument("results", nargs="?", help="jobs' result file (default: rebuild from set_study.json)")
    report.set_defaults(fn=cmd_report)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
