"""How int8 treats a detector: nudenet's YOLOv8n, every plan candidate judged by detections.

The plan's candidates (`plan_quantization`, default settings) on the 200 photos of
imagenet-samples, judged on the 40 held out as `optimize` holds them out (seed 2021); latency is
not measured here (every candidate is given the same cut), so this shows accuracy only: how many of
the float model's confident detections each candidate keeps and adds, and its whole-output
relative error (what the plan judged by before detections).

    python -m benchmarks.studies.int8_detector    # -> benchmarks/studies/results/int8_detector.md
"""

from __future__ import annotations

import json

from benchmarks.studies.base import study_results_dir


def main() -> None:
    import onnx

    from benchmarks.real_models import MODELS, tiny_set
    from graphprune.data import split_holdout
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import Timing, plan_quantization

    spec = MODELS["yolov8n_nudenet"]
    tiny = tiny_set(spec)
    _, holdout = split_holdout(tiny, 0.2, 16, 2021)
    plan = plan_quantization(onnx.load(str(spec.path())), tiny.images, holdout.images, QuantizeSettings(),
                             lambda proto: Timing(0.5))
    rows = [c.to_dict() for c in plan.candidates]
    (study_results_dir() / "int8_detector.json").write_text(json.dumps({"reason": plan.reason, "candidates": rows},
                                                                       indent=1))
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Made by `python -m benchmarks.studies.int8_detector`. Plan: {plan.reason}",
             "", "| candidate | kept / original | added | mAP50 against the original / reverse | relative error | within the bound |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["detections"] or {}
        map50 = "-" if d.get("map50") is None else f"{d['map50']:.3f} / {d.get('map50_reverse') or 0:.3f}"
        lines.append(f"| {r['config']['label']} | {d.get('kept')} / {d.get('original')} | {d.get('added')} | {map50} | "
                     f"{r['relative_error']:.3f} | {r['within_bound']} |")
    (study_results_dir() / "int8_detector.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
