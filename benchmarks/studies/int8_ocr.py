"""Why int8 stays off for PP-OCRv4's recogniser: which float groups and ranges would it need?

PP-OCRv4's recogniser (``rapidocr-onnxruntime``'s file fixed to 48 x 320, :mod:`benchmarks.real_models`)
on the 200 text lines of its tiny set (:mod:`benchmarks.text_lines`), calibrated on the same 200.
Each quantisation (qdq-u8s8) is scored against the float model: the lines read exactly
(``text_lines.read_rate``), the lines whose top class agrees at every position (the plan's judge)
and the share of positions that agree. Variants: calibration ranges (MinMax, the plan's; percentile
and entropy, read from the images that fit in memory, ``calibration.histogram_images``), and node
sets left in float: the transformer and the head (every node from the first MatMul on), every
Mul/Add/Sub/Div (PP-LCNetV3's learnable affine scales and the decomposed hard-swish), both.

    python -m benchmarks.studies.int8_ocr    # -> benchmarks/studies/results/int8_ocr.md

Found (2026-12-06, this 2-core EPYC, another job holding memory: the histogram methods read 16
images): the float model reads 78.5% of the lines, plain int8 41.5%. Neither the transformer and
head in float (42.5%) nor every elementwise op (46.5%), nor both (47.0%), brings it back: the loss is
in the convolutional backbone's activations. Percentile ranges read 59.5% (61.5% with the
elementwise ops in float), entropy 59.5%; at every position the top class agrees on at most 5% of
lines (the plan's bound: 97%). No float group or range method here comes near, so the plan leaves
int8 off, correctly; quantisation-aware mimicking (``quantize_mimic``) was measured in
``real_models`` (disagreement 0.930).
"""

from __future__ import annotations

import contextlib
import json
import time

from benchmarks.studies.base import study_results_dir

ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


@contextlib.contextmanager
def nodes_in_float(names: list[str]):
    """quantize_onnx leaves ``names`` in float as the float group "classifier" (the study's own node
    sets, which are no product role)."""
    from graphprune.passes import quantize

    real = quantize.float_group_nodes
    quantize.float_group_nodes = lambda graph, group: names if group == "classifier" else real(graph, group)
    try:
        yield
    finally:
        quantize.float_group_nodes = real


def float_sets(graph) -> dict[str, list[str]]:
    nodes = list(graph.graph.node)
    first_matmul = next(i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Gemm"))
    transformer = [n.name for n in nodes[first_matmul:]]
    elementwise = [n.name for n in nodes if n.op_type in ELEMENTWISE]
    return {"none": [], "transformer and head": transformer, "Mul/Add/Sub/Div": elementwise,
            "both": sorted(set(transformer) | set(elementwise))}


def main() -> None:
    import numpy as np
    import onnx

    from benchmarks.real_models import MODELS, TEXT_SEEDS, ppocr_rec_onnx, tiny_set
    from benchmarks.text_lines import dictionary_of, read_rate, render
    from graphprune.formats.ort_run import cpu_session, run_outputs
    from graphprune.passes.calibration import Calibrated
    from graphprune.passes.quantize import QuantConfig, quantization_info, quantize_onnx

    path = ppocr_rec_onnx()
    proto = onnx.load(str(path))
    images = tiny_set(MODELS["ppocrv4_rec"]).images.float()
    _, texts = render(len(images), TEXT_SEEDS["tiny"])
    dictionary = dictionary_of(path)
    reference = run_outputs(cpu_session(proto), images, 16)
    prepared = Calibrated(proto, images, 16)
    sets = float_sets(prepared.graph(13)[0])
    rows = [{"ranges": "float model", "float": "-", "read": read_rate(reference, texts, dictionary),
             "every_position": 1.0, "positions": 1.0, "float_nodes": 0, "calibration_images": 0}]
    variants = [("minmax", s) for s in sets]
    variants += [(m, s) for m in ("percentile", "entropy") for s in ("none", "Mul/Add/Sub/Div")]
    for method, name in variants:
        start = time.perf_counter()
        with nodes_in_float(sets[name]):
            quantized = quantize_onnx(prepared, config=QuantConfig(method=method,
                                                                  float_groups=("classifier",) if sets[name] else ()))
        out = run_outputs(cpu_session(quantized), images, 16)
        same = out.argmax(-1) == reference.argmax(-1)
        rows.append({"ranges": method, "float": name, "read": read_rate(out, texts, dictionary),
                     "every_position": float(same.all(1).mean()), "positions": float(same.mean()),
                     "float_nodes": len(sets[name]),
                     "calibration_images": quantization_info(quantized)["calibration_images"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out_dir = study_results_dir()
    (out_dir / "int8_ocr.json").write_text(json.dumps(rows, indent=1))
    lines = ["# int8 for PP-OCRv4's recogniser: float groups and calibration ranges", "",
             "Made by `python -m benchmarks.studies.int8_ocr`; qdq-u8s8 (per-channel int8 weights, uint8 activations), "
             "calibrated on and scored against the float model on the 200 rendered text lines of the tiny set.", "",
             "| ranges | left in float | nodes in float | calibration images | lines read exactly "
             "| same top class at every position | positions agreeing |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ranges']} | {r['float']} | {r['float_nodes']} | {r['calibration_images']} | "
              f"{100 * r['read']:.1f}% | {100 * r['every_position']:.1f}% | {100 * r['positions']:.1f}% |"
              for r in rows]
    (out_dir / "int8_ocr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
