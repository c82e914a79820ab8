"""MinMax against percentile ranges for int8 classifiers, and which images can judge them.

CIFAR ResNet-56 (500 tiny images of train_lossless_4000, seed 2021; test_lossless_1000 unseen) and
EfficientNet-Lite0 (the 200 photos of imagenet-samples; the 800 of imagenet-eval unseen), each
quantised as the plan's two u8s8 candidates with either range method, calibrated on its tiny set.
Each is scored against the float model on the held-out fifth `optimize` keeps (seed 2021), on the
whole tiny set (what the plan judges on) and on the unseen set: the drop in top-1 and the share of
images whose top class changed. The detector's counterpart is ``int8_detector``.

    python -m benchmarks.studies.int8_ranges    # -> benchmarks/studies/results/int8_ranges.md
"""

from __future__ import annotations

import json
from dataclasses import replace

from benchmarks.studies.base import study_results_dir

LABELS = ("qdq-u8s8", "qoperator-u8s8")
METHODS = ("minmax", "percentile")


def main() -> None:
    import onnx

    from benchmarks.common import DATA, ensure_models
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.data import Preprocessing, load_tiny_set, split_holdout
    from graphprune.formats.ort_run import cpu_session, run_outputs
    from graphprune.passes.calibration import Calibrated
    from graphprune.passes.quantize import QuantConfig, quantize_onnx

    cifar = Preprocessing((3, 32, 32))
    lite0 = MODELS["efficientnet_lite0"]
    models = [("resnet56", ensure_models()["resnet56"], load_tiny_set(DATA["train"], cifar, 500, seed=2021),
               load_tiny_set(DATA["test_lossless"], cifar)),
              ("efficientnet_lite0", str(lite0.path()), tiny_set(lite0), eval_set(lite0))]
    rows = []
    for name, path, tiny, unseen in models:
        _, held = split_holdout(tiny, 0.2, 16, 2021)
        proto = onnx.load(path)
        prepared = Calibrated(proto, tiny.images, 20)  # 20 divides both tiny sets: the histogram method needs equal batches
        sets = {"held-out": held, "tiny": tiny, "unseen": unseen}
        reference = {k: run_outputs(cpu_session(proto), s.images, 32).argmax(1) for k, s in sets.items()}
        for label in LABELS:
            for method in METHODS:
                session = cpu_session(quantize_onnx(prepared, config=replace(QuantConfig.from_label(label), method=method)))
                row = {"model": name, "label": label, "method": method}
                for k, s in sets.items():
                    top = run_outputs(session, s.images, 32).argmax(1)
                    truth = s.labels.numpy()
                    row[k] = {"images": len(truth), "top1_drop": float((reference[k] == truth).mean() - (top == truth).mean()),
                              "changed": float((top != reference[k]).mean())}
                rows.append(row)
                print(row, flush=True)
    (study_results_dir() / "int8_ranges.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# {__doc__.splitlines()[0]}", "", "Made by `python -m benchmarks.studies.int8_ranges`. Each cell: top-1 drop "
             "against the float model (points; negative: int8 better) / top class changed (%).", "",
             "| model | candidate | ranges | held-out | tiny (the plan's judge) | unseen |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{100 * r[k]['top1_drop']:+.2f} / {100 * r[k]['changed']:.2f} ({r[k]['images']})"
                           for k in ("held-out", "tiny", "unseen"))
        lines.append(f"| {r['model']} | {r['label']} | {r['method']} | {cells} |")
    (study_results_dir() / "int8_ranges.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
