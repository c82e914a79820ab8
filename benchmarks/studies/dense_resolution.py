"""Can the resolution lever serve detectors and map models, whose outputs follow the input's size?

The lever (``passes/resize_input.py``) runs a network behind a Resize at its entry and refuses a
model whose outputs change shape: a detector's anchors and a segmentation map do. Yet a user of a
detector asks first for a smaller input, and the blocks lever fails these models here: nudenet's
YOLOv8n at a 10% cut keeps mAP50 0.14 of the original's detections, PP-OCRv4 det's blocks cut 5% in
all. This study measures what the resize would give them, with the outputs mapped back to the
file's frame, in ONNX surgery on the original file (what a lowering would write):

* ``yolov8`` (N, 4 + C, anchors): a Resize by s after the input; the box rows (cx, cy, w, h) of the
  output multiplied by 1 / s, so boxes stay in the input's pixels; the anchors are fewer (the grid
  at the lower size), which any NMS reads;
* ``map`` (N, C, H, W): a Resize by s after the input and, before the output, a bilinear Resize
  back to (H, W), so the map keeps its shape.

Fidelity on the 800 photos of imagenet-eval against the original file, as ``real_models`` scores
the blocks lever: detections kept / added and mAP50 both ways (the lower of the two is the int8
plan's score), or the map's IoU with the original's; latency onnxruntime CPU 1 thread batch 1, every
file timed in one interleaved run (the median round; ``lite0_resolution``'s timer).

Which result changes what: YOLOv8n at a 15% cut or more with the lower mAP50 at 0.7 or more (the
blocks lever: 0.14 at 10%), or PP-OCRv4 det at 30% with map IoU 0.8 or more (int8's best: 0.53 from
the 0.05 bound's 0.95), means the lever is extended to these layouts; less means the refusal stays.

    python -m benchmarks.studies.dense_resolution run --model yolov8n_nudenet --sides 320,304,288,272,256
    python -m benchmarks.studies.dense_resolution run --model ppocrv4_det --sides 320,288,272,256
    python -m benchmarks.studies.dense_resolution report   # -> benchmarks/studies/results/dense_resolution.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks.studies.base import study_results_dir

NAME = "dense_resolution"
LAYOUTS = {"yolov8n_nudenet": "yolov8", "ppocrv4_det": "map"}


def _const(name: str, values, dtype=np.float32):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def resized_onnx(proto, full: int, side: int, layout: str, output_shape: tuple):
    """A copy of ``proto`` that runs its (N, C, ``full``, ``full``) input at ``side`` and maps its
    first output (``output_shape`` at ``full``) back to the file's frame (module docstring)."""
    import onnx
    from onnx import helper

    new = onnx.ModelProto()
    new.CopyFrom(proto)
    graph = new.graph
    image = graph.input[0].name
    scale = (side + 1e-3) / full
    graph.initializer.extend([_const("study_roi", []), _const("study_in_scales", [1, 1, scale, scale])])
    for node in graph.node:
        node.input[:] = ["study_resized" if name == image else name for name in node.input]
    resize_in = helper.make_node("Resize", [image, "study_roi", "study_in_scales"], ["study_resized"],
                                 mode="linear", coordinate_transformation_mode="half_pixel")
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["study_raw" if name == output else name for name in node.output]
    dims = list(output_shape)
    if layout == "yolov8":
        factors = np.ones((1, dims[1], 1), np.float32)
        factors[0, :4, 0] = 1.0 / scale
        graph.initializer.append(_const("study_box_scale", factors))
        back = helper.make_node("Mul", ["study_raw", "study_box_scale"], [output])
        del graph.output[0].type.tensor_type.shape.dim[:]  # the anchor count follows the size
    else:
        # sizes (N, C) of the map as it runs, then the file's (H, W): any batch
        graph.initializer.extend([_const("study_hw", dims[2:], np.int64), _const("study_zero", [0], np.int64),
                                  _const("study_two", [2], np.int64)])
        back = [helper.make_node("Shape", ["study_raw"], ["study_raw_shape"]),
                helper.make_node("Slice", ["study_raw_shape", "study_zero", "study_two"], ["study_nc"]),
                helper.make_node("Concat", ["study_nc", "study_hw"], ["study_out_sizes"], axis=0),
                helper.make_node("Resize", ["study_raw", "study_roi", "study_roi", "study_out_sizes"], [output],
                                 mode="linear", coordinate_transformation_mode="half_pixel")]
    nodes = [resize_in, *graph.node, *(back if isinstance(back, list) else [back])]
    del graph.node[:]
    graph.node.extend(nodes)
    return new


def _fidelity(layout: str, reference: np.ndarray, outputs: np.ndarray) -> dict:
    import torch

    if layout == "yolov8":
        from graphprune.detections import DetectionCounts, lower_map50

        counts = DetectionCounts()
        counts.add(torch.from_numpy(reference), torch.from_numpy(outputs))
        d = counts.as_dict()
        return {**d, "lower_map50": lower_map50(d)}
    from graphprune.fidelity import MapOverlap

    overlap = MapOverlap()
    overlap.add(torch.from_numpy(reference), torch.from_numpy(outputs))
    return {"map_iou": overlap.value()}


def run(model: str, sides: list[int]) -> None:
    import onnx

    from benchmarks.real_models import MODELS, eval_set
    from benchmarks.studies.lite0_resolution import _interleaved_ms
    from graphprune.formats.ort_run import cpu_session, run_outputs

    spec, layout = MODELS[model], LAYOUTS[model]
    proto = onnx.load(str(spec.path()))
    test = eval_set(spec)
    reference = run_outputs(cpu_session(proto), test.images, 32)
    full = test.images.shape[-1]
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for side in sides:
            variant = proto if side == full else resized_onnx(proto, full, side, layout, reference.shape)
            paths[side] = os.path.join(folder, f"{side}.onnx")
            onnx.save(variant, paths[side])
            outputs = run_outputs(cpu_session(variant), test.images, 32)
            rows.append({"side": side, **_fidelity(layout, reference, outputs)})
        timings = _interleaved_ms(paths, test.images[:1].numpy())
    base = timings[full]["median_ms"]
    for row in rows:
        t = timings[row["side"]]
        row.update(ms=t["median_ms"], iqr_ms=t["iqr_ms"], cut=1.0 - t["median_ms"] / base)
    path = study_results_dir() / f"{NAME}.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[model] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "load": os.getloadavg()[0],
                   "cpu": platform.processor() or platform.machine(), "layout": layout, "rows": rows}
    path.write_text(json.dumps(runs, indent=1))
    report()


def _cells(row: dict) -> str:
    if "map_iou" in row:
        return f"map IoU {row['map_iou']:.3f}"
    return (f"kept {row['kept']}/{row['original']}, added {row['added']}, mAP50 {row['map50']:.3f} "
            f"(reverse {row['map50_reverse']:.3f})")


def report() -> None:
    runs = json.loads((study_results_dir() / f"{NAME}.json").read_text())
    lines = [f"# {__doc__.splitlines()[0]}", ""]
    for model, r in runs.items():
        lines += [f"## {model} ({r['layout']})", "",
                  f"Command: `python -m benchmarks.studies.{NAME} run --model {model} --sides "
                  f"{','.join(str(x['side']) for x in r['rows'])}` (finished {r['finished']}; load average at the "
                  f"end {r['load']:.2f}). Fidelity on the 800 photos of imagenet-eval against the original file.", "",
                  "| side | cut | ms (IQR) | fidelity |", "|---|---|---|---|"]
        lines += [f"| {x['side']} | {100 * x['cut']:.1f}% | {x['ms']:.2f} ({x['iqr_ms']:.2f}) | {_cells(x)} |"
                  for x in r["rows"]]
        lines.append("")
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--model", choices=sorted(LAYOUTS), required=True)
    go.add_argument("--sides", default="320,304,288,272,256")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.model, [int(s) for s in args.sides.split(",")])
    else:
        report()


if __name__ == "__main__":
    main()
