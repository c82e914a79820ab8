"""Which held-out signal tells recovery that it is making EfficientNet-Lite0 worse?

Recovery's guard keeps the checkpoint (start included) with the lowest *feature* error on the 40
held-out photos. On Lite0 that error fell while top-1 on the 800 imagenet-eval photos fell too:
Block Influence's four blocks (9, 10, 13, 14) scored 76.25 untrained (``lite0_blocks``) and 73.62
after the guard kept step 200 of 1200 (``real_models``); in ``lite0_recovery`` every variant that
trained lowered the held-out feature error by 6-14% and none lifted top-1. This study trains one
block set with the product's recovery and, at each of its checkpoints, measures every signal the
product could use on the held-out photos (the guard's feature error; the logits' relative error,
KL(original || pruned) and top-class agreement, through the frozen classifier) beside the truth
(top-1 and KL on the 800). Early stopping's patience is lifted so that the whole curve is seen.

Which result changes what: a held-out signal whose best checkpoint is the best (or near it) by
top-1 on the 800, where the feature error's is not, becomes the guard's signal; if none does,
recovery on large images cannot be judged from 40 photos and should not spend the time.

    python -m benchmarks.studies.lite0_guard run --blocks _blocks.9,_blocks.10,_blocks.13,_blocks.14 [--iterations 400]
    python -m benchmarks.studies.lite0_guard report   # -> benchmarks/studies/results/lite0_guard.md
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from benchmarks.studies.base import study_results_dir

NAME = "lite0_guard"
FINDINGS = ("On both block sets, every variant raised the held-out KL from the first checkpoint on, and top-1 on the "
            "800 followed it down (feature MSE at lr 3e-4: 76.25 -> 73.25-73.87; at 3e-5: 81.25 -> 80.25-81.38; KD on "
            "the logits at 3e-4: 76.25 -> 64.88-66.87; at 3e-5: 80.25-81.12), while in the MSE runs the feature MSE "
            "and the logits' L2 error fell: guards on those keep trained weights that are worse. The 40 photos' KL moved with "
            "the 800's at every checkpoint, so recovery now guards a classifier by it (`recovery_parts.holdout_signal`). "
            "KD at lr 1e-5 stayed level (held-out KL 0.243 -> 0.243, 0.250; top-1 81.38, 81.88; the 800's KL "
            "0.206 -> 0.215, 0.217). Nothing trained on 160 of these photos brought Lite0's classes closer to the "
            "original's on photos of other classes.")


def _logit_signals(logits: torch.Tensor, reference: torch.Tensor, labels=None) -> dict:
    """lite0_blocks' tiny-set signals against the original, and top-1 where there are labels."""
    from benchmarks.studies.lite0_blocks import _signals

    out = _signals(logits, reference)
    if labels is not None:
        out["top1"] = float((logits.argmax(1) == labels).float().mean())
    return out


def _kd_loss(temperature: float):
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, summed over the targets (knowledge
    distillation's loss), in place of recovery's MSE where the mimicked tensor is the logits."""
    def loss(student, teacher, weights):
        return sum(w * torch.nn.functional.kl_div((s / temperature).log_softmax(1), (t / temperature).log_softmax(1),
                                                  log_target=True, reduction="batchmean") * temperature ** 2
                   for s, t, w in zip(student, teacher, weights)) / len(weights)
    return loss


def run(names: list[str], iterations: int, settings: dict, feature_node: str | None = None,
        kd_temperature: float | None = None) -> None:
    import graphprune as gp
    import graphprune.passes.recover as recover_module
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from benchmarks.studies.lite0_blocks import _logits
    from graphprune.checkpoints import BestCheckpoint
    from graphprune.data import split_holdout
    from graphprune.model import Model
    from graphprune.passes import find_blocks

    spec = MODELS["efficientnet_lite0"]
    original = gp.load(str(spec.path()))
    blocks = find_blocks(original)
    pruned = gp.drop_blocks(original, names, blocks)
    train, holdout = split_holdout(tiny_set(spec), 0.2, 16, 2021)  # as optimize splits it (seed 2021)
    test = eval_set(spec)
    reference = {"holdout": _logits(original, holdout), "eval": _logits(original, test)}
    first = next(b.entry for b in blocks if b.name in names)
    clones: list[Model] = []  # recover's student: its graph module shares the weights being trained
    curve: list[dict] = []
    plain_clone = Model.clone

    def clone(self):
        copy = plain_clone(self)
        if self is pruned:
            clones.append(copy)
        return copy

    class Probe(BestCheckpoint):
        def check(self, step):
            error = super().check(step)
            curve.append(_probe(step, error))
            return error

    def _probe(step: int, feature_error: float) -> dict:
        student = clones[-1]
        point = {"step": step, "holdout_feature_error": feature_error,
                 "holdout": _logit_signals(_logits(student, holdout), reference["holdout"]),
                 "eval": _logit_signals(_logits(student, test), reference["eval"], test.labels)}
        print(json.dumps(point), flush=True)
        return point

    start = time.time()
    with mock.patch.object(Model, "clone", clone), mock.patch.object(recover_module, "BestCheckpoint", Probe), \
            mock.patch.object(recover_module, "EARLY_STOP_PATIENCE", 10 ** 6), \
            mock.patch.object(recover_module, "mimic_loss",
                              _kd_loss(kd_temperature) if kd_temperature else recover_module.mimic_loss):
        recovery = recover_module.RecoverySettings(iterations=iterations, **settings)
        _, record = recover_module.recover(pruned, original, train, recovery, feature_node, show_progress=False,
                                           frozen_until=first, holdout=holdout)
    untrained = {"holdout": _logit_signals(_logits(pruned, holdout), reference["holdout"]),
                 "eval": _logit_signals(_logits(pruned, test), reference["eval"], test.labels)}
    curve.insert(0, {"step": 0, "holdout_feature_error": record["early_stop"]["checkpoints"][0]["holdout_error"],
                     **untrained})
    if feature_node:
        settings = {**settings, "feature_node": feature_node}
    if kd_temperature:
        settings = {**settings, "kd_temperature": kd_temperature}
    row = {"blocks": names, "iterations": iterations, "settings": settings, "crop": spec.crop,
           "kept_step": record["early_stop"]["best_step"], "curve": curve, "seconds": round(time.time() - start)}
    with (study_results_dir() / f"{NAME}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


# what each signal picks: the checkpoint that minimises it (agreement: maximises)
SIGNALS = {"held-out feature error (today's guard)": lambda p: p["holdout_feature_error"],
           "held-out logits relative error": lambda p: p["holdout"]["relative_error"],
           "held-out KL": lambda p: p["holdout"]["kl"],
           "held-out agreement": lambda p: -p["holdout"]["agreement"],
           "eval KL (not available to the product)": lambda p: p["eval"]["kl"]}


def report() -> None:
    rows = [json.loads(line) for line in (study_results_dir() / f"{NAME}.jsonl").read_text().splitlines()]
    lines = [f"# {__doc__.splitlines()[0]}", "", "Made by `python -m benchmarks.studies.lite0_guard run ...`; "
             "recovery with the product's settings but for those shown, its guard's patience lifted; signals at "
             "every checkpoint; top-1 and KL on the 800 imagenet-eval photos, the rest on the 40 held-out photos "
             "of the tiny set (split as optimize splits it, seed 2021). The mimic loss is the feature MSE, or with "
             "`kd_temperature` the logits' KL (knowledge distillation, the classifier training too); rows stopped "
             "by hand were copied from the run's printed checkpoints once their trend was plain.", "", FINDINGS, ""]
    for r in rows:
        stopped = f", stopped by hand after step {r['stopped_by_hand_at']}" if r.get("stopped_by_hand_at") else ""
        lines += [f"## {', '.join(r['blocks'])}: {r['iterations']} steps, {json.dumps(r['settings'])} "
                  f"({r['seconds'] or '-'} s{stopped})", "",
                  "| step | held-out mimic loss | held-out logits rel. error | held-out KL | held-out agreement | "
                  "eval KL | eval top-1 |", "|---|---|---|---|---|---|---|"]
        for p in r["curve"]:
            h, e = p["holdout"], p["eval"]
            lines.append(f"| {p['step']} | {p['holdout_feature_error']:.5f} | {h['relative_error']:.4f} | "
                         f"{h['kl']:.4f} | {100 * h['agreement']:.1f} | {e['kl']:.4f} | {100 * e['top1']:.2f} |")
        lines += ["", "What each signal would keep (eval top-1 of that checkpoint):", ""]
        for label, key in SIGNALS.items():
            best = min(r["curve"], key=key)
            lines.append(f"- {label}: step {best['step']}, top-1 {100 * best['eval']['top1']:.2f}")
        lines.append("")
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--blocks", required=True, help="comma-separated block names")
    go.add_argument("--iterations", type=int, default=400)
    go.add_argument("--settings", default="{}", help="other RecoverySettings fields, as JSON")
    go.add_argument("--feature-node", help="the mimicked node, as optimize's --feature-node (n114: the logits)")
    go.add_argument("--kd-temperature", type=float, help="train with KD's KL loss at this temperature, not MSE")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.blocks.split(","), args.iterations, json.loads(args.settings), args.feature_node, args.kd_temperature)
    else:
        report()


if __name__ == "__main__":
    main()
