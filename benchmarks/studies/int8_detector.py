"""How int8 treats a detector: nudenet's YOLOv8n, and which images can judge it.

The plan's candidates (`plan_quantization`, default settings, judged as `optimize` judges them: on
all 200 photos of imagenet-samples, which calibration reads too), each then scored three ways
against the float model: on the 40 photos `optimize` holds out (seed 2021; the plan judged on
these before), on all 200, and on the 800 photos of imagenet-eval, which calibration never saw
(the truth the other two estimate). Each with MinMax ranges (the plan's) and with percentile
ranges. Latency is not measured (every candidate is given the same cut): accuracy only. The score
is the plan's: the lower of mAP50 against the float model's confident detections and the reverse.

    python -m benchmarks.studies.int8_detector    # -> benchmarks/studies/results/int8_detector.md
"""

from __future__ import annotations

import json
from dataclasses import replace

from benchmarks.studies.base import study_results_dir

METHODS = ("minmax", "percentile")


def main() -> None:
    import onnx
    import torch

    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.data import split_holdout
    from graphprune.detections import DetectionCounts, lower_map50
    from graphprune.formats.ort_run import cpu_session, run_outputs
    from graphprune.passes.calibration import Calibrated
    from graphprune.passes.quantize import QuantizeSettings, quantize_onnx
    from graphprune.passes.quantize_plan import Timing, plan_quantization

    spec = MODELS["yolov8n_nudenet"]
    tiny = tiny_set(spec)
    _, holdout = split_holdout(tiny, 0.2, 16, 2021)
    proto = onnx.load(str(spec.path()))
    plan = plan_quantization(proto, tiny.images, tiny.images, QuantizeSettings(), lambda q: Timing(0.5))
    sets = {"held-out 40": holdout.images, "tiny 200": tiny.images, "eval 800": eval_set(spec).images}
    reference = {name: run_outputs(cpu_session(proto), images, 32) for name, images in sets.items()}
    prepared = Calibrated(proto, tiny.images, 40)  # 40: equal batches, which the histogram methods need
    rows = []
    for candidate in plan.candidates:
        for method in METHODS:
            quantized = cpu_session(quantize_onnx(prepared, config=replace(candidate.config, method=method)))
            row = {"label": candidate.config.label, "method": method,
                   "plan_within_bound": candidate.within_bound if method == "minmax" else None}
            for name, images in sets.items():
                counts = DetectionCounts()
                counts.add(torch.from_numpy(reference[name]), torch.from_numpy(run_outputs(quantized, images, 32)))
                d = counts.as_dict()
                row[name] = {"map50": d["map50"], "map50_reverse": d["map50_reverse"], "lower": lower_map50(d),
                             "detections": d["original"]}
            rows.append(row)
    (study_results_dir() / "int8_detector.json").write_text(json.dumps({"reason": plan.reason, "rows": rows}, indent=1))
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Made by `python -m benchmarks.studies.int8_detector`. "
             f"Plan (judged on the 200): {plan.reason}", "",
             "Each cell: the lower of mAP50 against the float model and the reverse (the float model's confident "
             "detections on that set in the header).", "",
             "| candidate | ranges | plan: within the 0.05 bound | " + " | ".join(
                 f"{name} ({rows[0][name]['detections']})" for name in sets) + " |",
             "|---|---|---|" + "---|" * len(sets)]
    for r in rows:
        cells = " | ".join("-" if r[name]["lower"] is None else f"{r[name]['lower']:.3f}" for name in sets)
        within = "" if r["plan_within_bound"] is None else str(r["plan_within_bound"])
        lines.append(f"| {r['label']} | {r['method']} | {within} | {cells} |")
    (study_results_dir() / "int8_detector.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
