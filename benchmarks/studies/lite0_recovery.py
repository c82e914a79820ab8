"""Does recovery help EfficientNet-Lite0 with 200 photos? Variants on one fixed block set.

The set: the four blocks graphprune dropped at a 22% cut (seed 2021, ``benchmarks/results/
real_models.json``): ``_blocks.4, _blocks.7, _blocks.9, _blocks.10``. The tiny set is the 200
photos of ``imagenet-samples`` (one per 5th class), split as ``optimize`` splits it (40 held out,
seed 2021); recovery trains on the other 160 with the held-out guard (``early_stop``: the
checkpoint, the start included, with the lowest held-out error of the mimicked tensors is kept).
top-1 is on the 800 photos of ``imagenet-eval`` (the classes the tiny set does not hold).

Each variant is a JSON object of ``RecoverySettings`` fields, plus ``feature_node`` (the mimicked
tensors, as ``--feature-node``; ``n114`` is Lite0's logits), plus ``side``: the network behind a
Resize to that side at its entry (``--lever resolution``) instead of the block set, all of it
trained (FixRes-like: the original's weights taught to see smaller objects). Which result changes
what: a side within 2 points of 87.12 after recovery where it was not before (192 px: 84.38; a
~22% cut) makes recovery a step of the resolution lever, kept where the held-out signal improves;
no lift keeps the lever training-free and the 2-point goal blocked in float.

    python -m benchmarks.studies.lite0_recovery run '{"iterations": 300, "lr": 1e-4, "augment": "resized-crop-flip-mixup"}'
    python -m benchmarks.studies.lite0_recovery report    # -> benchmarks/studies/results/lite0_recovery.md
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.studies.base import study_results_dir

BLOCKS = ("_blocks.4", "_blocks.7", "_blocks.9", "_blocks.10")
FINDINGS = ("No variant lifts top-1 above the untrained pruned network: each lowers the held-out feature "
            "error (by 6-14% where it trains to the end) while top-1 on the other 800 classes stays level "
            "(feature map at lr 1e-4, biases only: -0.12, 1 photo) or falls (features at lr 1e-4: -0.62 at crop "
            "1.0 with mixup, -1.38 at 0.875; "
            "logits: -1.12). On this model and 160 photos of 200 classes, a lower held-out feature error does "
            "not mean a better classifier on the classes the tiny set lacks; the 2-point goal has to come from "
            "the blocks chosen (benchmarks/studies/lite0_blocks.py), or from int8. "
            "Behind a resize (rows with a side; no block dropped) the same: the held-out error (the class KL, "
            "as the guard judges) falls by 42-64% (192 px, all weights at lr 1e-4: 0.193 -> 0.112; biases at "
            "lr 1e-3: -> 0.096; 176 px, biases: 0.560 -> 0.200) while top-1 on the 800 moves by -0.88, +0.37 "
            "and +0.63 (7, 3 and 5 photos), so no side comes within 2 points of 87.12 (192 px: 84.75 at best) "
            "and the resolution lever stays training-free. A 191 px run was stopped unfinished: the decision "
            "did not hang on it. The 40 held-out photos' KL overstates what training gains on the classes "
            "they do not hold, which lever 'auto' has to weigh when it compares a trained lever with an "
            "untrained one.")
NAME = "lite0_recovery"


def run(variants: list[dict]) -> None:
    import graphprune as gp
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.data import split_holdout
    from graphprune.evaluate import evaluate
    from graphprune.passes import find_blocks
    from graphprune.passes.recover import RecoverySettings, recover
    from graphprune.passes.resize_input import resize_input, scale_for

    spec = MODELS["efficientnet_lite0"]
    original = gp.load(str(spec.path()))
    blocks = find_blocks(original)
    pruned = gp.drop_blocks(original, list(BLOCKS), blocks)
    train, holdout = split_holdout(tiny_set(spec), 0.2, 16, 2021)
    test = eval_set(spec)
    first = next(b.entry for b in blocks if b.name in BLOCKS)
    side = original.example_inputs()[0].shape[-1]
    out = study_results_dir() / f"{NAME}.jsonl"
    for variant in variants:
        settings = dict(variant)
        feature_node = settings.pop("feature_node", None)
        resized_to = settings.pop("side", None)
        student = pruned if resized_to is None else resize_input(original, scale_for(side, resized_to))
        start = time.time()
        recovered, record = recover(student, original, train, RecoverySettings(**settings), feature_node,
                                    show_progress=False, frozen_until=None if resized_to else first,
                                    holdout=holdout)
        guard = record["early_stop"]
        row = {"variant": variant, "blocks": [] if resized_to else list(BLOCKS), "crop": spec.crop,
               "seconds": round(time.time() - start),
               "best_step": guard["best_step"],
               "holdout_error": [(c["step"], round(c["holdout_error"], 5)) for c in guard["checkpoints"]],
               "top1": evaluate(recovered, test)["top1"], "top1_no_recovery": evaluate(student, test)["top1"]}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def report() -> None:
    rows = [json.loads(line) for line in (study_results_dir() / f"{NAME}.jsonl").read_text().splitlines()]
    lines = [f"# {__doc__.splitlines()[0]}", "", "Made by `python -m benchmarks.studies.lite0_recovery run ...`; "
             f"blocks {', '.join(BLOCKS)}; top-1 on the 800 imagenet-eval photos (crop: the central fraction "
             "of the image kept before resizing; 0.875 is ImageNet's 256 -> 224).", "", FINDINGS, "",
             "| variant | crop | held-out error (start -> kept step: value; last) | top-1 kept (no recovery) | seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        curve = r["holdout_error"]
        kept = next(e for s, e in curve if s == r["best_step"])
        lines.append(f"| `{json.dumps(r['variant'])}` | {r['crop']} | {curve[0][1]} -> {r['best_step']}: {kept}; {curve[-1][1]} | "
                     f"{100 * r['top1']:.2f} ({100 * r['top1_no_recovery']:.2f}) | {r['seconds']} |")
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("variants", nargs="+", help="JSON objects of RecoverySettings fields")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run([json.loads(v) for v in args.variants])
    else:
        report()


if __name__ == "__main__":
    main()
