"""Where int8 loses on a detector, and what quantisation-aware mimicking wins back: nudenet's YOLOv8n.

One int8 config (default: the plan's closest candidate on this model, QDQ u8/s8 with Add/Concat and
the decoding in float), calibrated on the 200 photos of imagenet-samples, scored against the float
model on those 200 and on the 800 photos of imagenet-eval that neither calibration nor training
saw. Rows:

* int8 as onnxruntime makes it (post-training quantisation, MinMax);
* its weights only (the float graph with each weight replaced by its int8 per-channel rounding);
* its activations only (the int8 graph with each weight's DequantizeLinear replaced by the float weight);
* quantisation-aware mimicking (``graphprune.passes.quantize_mimic``) for 100 and 200 steps, the
  trained weights quantised with the ranges they were trained for (what graphprune writes) and,
  from the same training, with ranges calibrated anew.

The score is the plan's: the lower of mAP50 against the float model's confident detections and the
reverse. Latency is not measured (the graphs are the same).

    python -m benchmarks.studies.int8_mimic    # -> benchmarks/studies/results/int8_mimic.md
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.studies.base import study_results_dir

LABEL = "qdq-u8s8+float:add_concat+float:decode"
STEPS = (100, 200)


def weights_only(float_proto, quantized):
    """The float graph with every per-channel int8 weight replaced by its rounding."""
    import onnx
    from onnx import numpy_helper

    from graphprune.passes.quantize_mimic import WEIGHT_SUFFIX

    inits = {t.name: t for t in quantized.graph.initializer}
    rounded = {}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(WEIGHT_SUFFIX) and node.input[0] in inits:
            stored = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 else 0.0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * stored.ndim
            shape[axis] = -1
            if scale.size > 1:
                scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
            rounded[node.input[0].removesuffix(WEIGHT_SUFFIX)] = ((stored - zero) * scale).astype(np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(float_proto)
    for init in out.graph.initializer:
        if init.name in rounded and tuple(init.dims) == rounded[init.name].shape:
            init.CopyFrom(numpy_helper.from_array(rounded[init.name], init.name))
    return out


def activations_only(float_proto, quantized):
    """The int8 graph reading each rounded weight's float original instead."""
    import onnx

    from graphprune.passes.quantize_mimic import WEIGHT_SUFFIX

    floats = {t.name: t for t in float_proto.graph.initializer}
    inits = {t.name for t in quantized.graph.initializer}
    replaced = {}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith(WEIGHT_SUFFIX):
            name = node.input[0].removesuffix(WEIGHT_SUFFIX)
            if name in floats:
                replaced[node.output[0]] = name
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    kept = [n for n in out.graph.node if n.output[0] not in replaced]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = replaced.get(name, name)
    out.graph.initializer.extend(floats[name] for name in sorted(set(replaced.values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=LABEL, help="the int8 config (a plan label)")
    args = parser.parse_args()

    import torch

    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.detections import DetectionCounts, lower_map50
    from graphprune.formats.model_io import load, to_onnx
    from graphprune.formats.ort_run import cpu_session, run_outputs
    from graphprune.passes.calibration import Calibrated
    from graphprune.passes.quantize import QuantConfig, quantize_onnx
    from graphprune.passes.quantize_mimic import MimicSettings, mimic_quantized

    spec = MODELS["yolov8n_nudenet"]
    tiny = tiny_set(spec)
    model = load(str(spec.path()))
    float_proto = to_onnx(model, verify=False)
    sets = {"tiny 200": tiny.images, "eval 800": eval_set(spec).images}
    reference = {name: run_outputs(cpu_session(float_proto), images, 32) for name, images in sets.items()}

    def scores(proto) -> dict:
        session, out = cpu_session(proto), {}
        for name, images in sets.items():
            counts = DetectionCounts()
            counts.add(torch.from_numpy(reference[name]), torch.from_numpy(run_outputs(session, images, 32)))
            out[name] = lower_map50(counts.as_dict())
        return out

    config = QuantConfig.from_label(args.label)
    before = Calibrated(float_proto, tiny.images)
    plain = quantize_onnx(before, config=config)
    rows = [{"row": "int8 (post-training)", **scores(plain)},
            {"row": "int8 weights only", **scores(weights_only(before.graph(before.opset)[0], plain))},
            {"row": "int8 activations only", **scores(activations_only(before.graph(before.opset)[0], plain))}]
    for steps in STEPS:
        start = time.perf_counter()
        trained, record = mimic_quantized(model, model, before, config, MimicSettings(steps=steps))
        seconds = time.perf_counter() - start
        same, anew = Calibrated(to_onnx(trained), tiny.images), Calibrated(to_onnx(trained), tiny.images)
        same.take_ranges(before)
        rows.append({"row": f"mimic {steps} steps, the ranges it trained for", "train_s": round(seconds),
                     "loss_first": record["loss_first"], "loss_last": record["loss_last"],
                     **scores(quantize_onnx(same, config=config))})
        rows.append({"row": f"mimic {steps} steps, ranges calibrated anew", **scores(quantize_onnx(anew, config=config))})
        print(rows[-2], rows[-1], flush=True)
    (study_results_dir() / "int8_mimic.json").write_text(json.dumps({"label": args.label, "rows": rows}, indent=1))
    lines = [f"# {__doc__.splitlines()[0]}", "", f"Made by `python -m benchmarks.studies.int8_mimic` (config "
             f"{args.label}). Each cell: the lower of mAP50 against the float model and the reverse.", "",
             "| model | " + " | ".join(sets) + " | training s | mimic loss first -> last 10% |", "|---|" + "---|" * (len(sets) + 2)]
    for r in rows:
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else ""
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[name]:.3f}" for name in sets) + f" | {r.get('train_s', '')} | {loss} |")
    (study_results_dir() / "int8_mimic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
