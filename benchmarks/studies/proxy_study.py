"""Would another set-level proxy rank 40% block sets of ResNet-56 better than the joint J?

``refine_selection`` ranks block sets by their joint recoverability J (held-out feature MSE after
fitting adaptors around every gap; ``refine_study.md``). Every 40% set of ResNet-56 that has been
recovered with the default recovery and 500 images (set_study's 23 sets, and the sets of the
graphprune, block-influence and random-blocks rows of ``cifar10_resnet56.json``, seeds 2021-2025)
gets one joint adaptor fit, and from that one fit these proxies:

* ``feat``: feature MSE (on the held-out split this is J itself), ``logit``: MSE of the logits
  (the frozen classifier applied to the features), ``kl``: KL(teacher || pruned) of the softmax,
  ``disagree``: the fraction of images whose top class changes;
* each on the held-out 20% of the tiny set (``ho``: what graphprune may use), on the 80% the
  adaptors were fitted on (``tr``), and on 1000 other images of train_lossless_4000 that are not
  in the tiny set (``pool``: an oracle-sized held-out set, to see whether 100 held-out images
  limit J).

The report gives, per seed, the Spearman correlation of each proxy with the sets' recovered top-1
(positive: a lower error goes with a higher top-1) and its mean over seeds weighted by the number
of sets. Test labels judge the sets here only. Resumable: one JSON line per set.

    python -m benchmarks.studies.proxy_study run       # about 8 s a set on a 2-core CPU
    python -m benchmarks.studies.proxy_study report    # -> benchmarks/studies/results/proxy_study.{json,md}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import DATA, results_dir, run_report_main
from benchmarks.studies.base import study_results_dir

SAMPLES, POOL = 500, 1000
DEFAULT_ITERATIONS = 50  # graphprune's default adaptor steps (RecoverabilitySettings.iterations)
PROXIES = ("feat", "logit", "kl", "disagree")
SPLITS = ("ho", "tr", "pool")


def recovered_sets() -> dict[tuple[int, tuple[str, ...]], list]:
    """(seed, sorted blocks) -> [(source, top-1 lossless1000, top-1 jpeg10k), ...]."""
    sets: dict = {}
    for r in json.loads((study_results_dir() / "set_study.json").read_text())["rows"]:
        sets.setdefault((r["seed"], tuple(sorted(r["blocks"]))), []).append(
            (r["set"], r["top1_lossless1000"], r["top1_jpeg10k"]))
    for r in json.loads((results_dir() / "cifar10_resnet56.json").read_text())["rows"]:
        if r["latency_cut_target"] == 0.4 and r["samples"] == SAMPLES and \
                r["method"] in ("graphprune", "block-influence", "random-blocks"):
            sets.setdefault((r["seed"], tuple(sorted(r["removed"]["blocks"]))), []).append(
                (r["method"], r["top1_lossless1000"], r["top1_jpeg10k"]))
    return sets


def _iterations(record: dict) -> int:
    return record.get("iterations", DEFAULT_ITERATIONS)  # records made before the option: the default


def _done(path: Path) -> dict[tuple[int, str], dict]:
    """(adaptor steps, set) -> record."""
    records = map(json.loads, path.read_text().splitlines()) if path.exists() else []
    return {(_iterations(r), r["key"]): r for r in records}


def _proxies(features, teacher, head) -> dict[str, float]:
    import torch.nn.functional as F

    from graphprune.features import run_batched

    logits, target = run_batched(head, features), run_batched(head, teacher)
    return {"feat": float(F.mse_loss(features, teacher)), "logit": float(F.mse_loss(logits, target)),
            "kl": float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target, 1), log_target=True,
                                 reduction="batchmean")),
            "disagree": float((logits.argmax(1) != target.argmax(1)).float().mean())}


def cmd_run(args) -> None:
    import torch
    from benchmarks.compare_methods import Bench

    from graphprune.data import Preprocessing, load_tiny_set, split_holdout
    from graphprune.features import feature_node_name, run_batched, suffix_from, truncate
    from graphprune.optimize import OptimizeConfig
    from graphprune.passes.recoverability import _Context, shape_region

    class Fitted(_Context):
        """The joint fit, keeping the fitted student (the graph after the cached prefix)."""
        def _holdout_mse(self, features_gm, inputs):
            self.student = features_gm
            return super()._holdout_mse(features_gm, inputs)

    out = study_results_dir() / "proxy_study.jsonl"
    done = _done(out)
    bench = Bench()
    model = bench.models["resnet56"]
    gm, blocks = model.graph_module, bench.gp.find_blocks(model)
    feature = feature_node_name(model)
    head = suffix_from(gm, feature, gm.graph.output_node().all_input_nodes[0].name)  # the classifier
    every = load_tiny_set(DATA["train"], Preprocessing((3, 32, 32)))
    sets = recovered_sets()
    for seed in sorted({s for s, _ in sets}):
        tiny = bench._tiny(SAMPLES, seed)
        train, holdout = split_holdout(tiny, seed=seed)
        inside = {hashlib.md5(x.numpy().tobytes()).hexdigest() for x in tiny.images}
        others = [i for i, x in enumerate(every.images) if hashlib.md5(x.numpy().tobytes()).hexdigest() not in inside]
        order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:POOL]
        pool = every.images[torch.tensor(others)[order]]
        settings = replace(OptimizeConfig().recoverability, seed=seed, iterations=args.iterations)
        context = Fitted(model, blocks, train, holdout, feature, settings)
        teacher_pool = run_batched(truncate(gm, feature), pool)
        for (set_seed, names), sources in sets.items():
            key = f"{seed}/{'|'.join(names)}"
            if set_seed != seed or (args.iterations, key) in done:
                continue
            start = time.perf_counter()
            joint = context.score_set(list(names))
            first = shape_region(blocks, next(b for b in blocks if b.name in names))[0].entry
            train_in, holdout_in = context._prefix(first)
            pool_in = run_batched(truncate(gm, first), pool)
            student = context.student
            record = {"key": key, "seed": seed, "iterations": args.iterations, "blocks": list(names),
                      "per_stage": [sum(n.startswith(f"layer{i}.") for n in names) for i in (1, 2, 3)],
                      "sources": sources, "J": joint,
                      "ho": _proxies(run_batched(student, holdout_in), context.teacher_holdout, head),
                      "tr": _proxies(run_batched(student, train_in), context.teacher_train, head),
                      "pool": _proxies(run_batched(student, pool_in), teacher_pool, head),
                      "seconds": time.perf_counter() - start}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{key[:50]}  J {joint:.4f}  top-1 {100 * sources[0][1]:.1f}", flush=True)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spearman(records: list[dict], seeds: list[int], column: int, split: str, proxy: str) -> tuple[float, list]:
    """Per-seed Spearman of ``split``/``proxy`` with recovered top-1 (``column`` 1: lossless1000,
    2: jpeg10k), positive when lower error goes with higher top-1; and its mean weighted by sets."""
    from scipy.stats import spearmanr

    per_seed, weights = [], []
    for seed in seeds:
        rows = [r for r in records if r["seed"] == seed]
        top1 = [_mean([s[column] for s in r["sources"]]) for r in rows]
        per_seed.append(-float(spearmanr([r[split][proxy] for r in rows], top1).statistic))
        weights.append(len(rows))
    return sum(w * v for w, v in zip(weights, per_seed)) / sum(weights), per_seed


def cmd_report(args) -> None:
    every = list(_done(study_results_dir() / "proxy_study.jsonl").values())
    counts = sorted({_iterations(r) for r in every}, key=lambda n: (n != DEFAULT_ITERATIONS, n))
    seeds = sorted({r["seed"] for r in every})
    by_count = {n: [r for r in every if _iterations(r) == n] for n in counts}
    summary, lines = {}, ["# Which set-level proxy predicts a 40% block set's recovered top-1? (ResNet-56)", "",
                          "Command: `python -m benchmarks.studies.proxy_study run [--iterations N] && python -m "
                          "benchmarks.studies.proxy_study report`. One joint adaptor fit per set (graphprune's default "
                          f"estimator, {DEFAULT_ITERATIONS} Adam steps unless the row names another count); every set "
                          "that was recovered with the default recovery and 500 images (set_study, and the "
                          "40% rows of cifar10_resnet56.json; a set recovered twice counts with its mean "
                          "top-1). `ho`: the held-out 20% of the tiny set (`ho feat` is J); `tr`: the "
                          "images the adaptors were fitted on; `pool`: 1000 other training images. Spearman "
                          "correlation with recovered top-1 per seed, and its mean weighted by sets. Sets per "
                          "seed: " + "; ".join(f"{n} steps: " + ", ".join(
                              f"{s}: {sum(r['seed'] == s for r in rows)}" for s in seeds) for n, rows in by_count.items()),
                          ""]
    for column, test in ((1, "lossless1000"), (2, "jpeg10k")):
        lines += [f"## top-1 {test}", "", "| proxy | mean | " + " | ".join(map(str, seeds)) + " |",
                  "|---|---|" + "---|" * len(seeds)]
        for count, records in by_count.items():
            steps = "" if count == DEFAULT_ITERATIONS else f", {count} steps"
            present = sorted({r["seed"] for r in records})
            for split in SPLITS:
                for proxy in PROXIES:
                    mean, per_seed = _spearman(records, present, column, split, proxy)
                    summary[f"{test}/{split}/{proxy}/{count}"] = {"mean": mean, "per_seed": dict(zip(present, per_seed))}
                    cells = [f"{dict(zip(present, per_seed))[s]:.2f}" if s in present else "-" for s in seeds]
                    lines.append(f"| {split} {proxy}{steps} | {mean:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    (study_results_dir() / "proxy_study.md").write_text("\n".join(lines))
    (study_results_dir() / "proxy_study.json").write_text(json.dumps({"summary": summary, "sets": every}, indent=1))
    print("\n".join(lines))


def _run_options(parser) -> None:
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="adaptor steps of each joint fit (the report compares other counts with the default)")


if __name__ == "__main__":
    run_report_main(__doc__, cmd_run, cmd_report, _run_options)
