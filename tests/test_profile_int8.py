"""``graphprune profile --quantize``: int8 planned as optimize plans it (or a given config), timed
against the float model; and an already-quantised ONNX file profiled as it is. A one-block ONNX
model (onnx_builders.residual_onnx: 4 channels, 8x8) and 40 random images; fake timings wherever
a timing decides what is asserted."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from graphprune.backends import onnxruntime_int8
from graphprune.passes.quantize import QuantConfig, QuantizeSettings, is_quantized, quantization_info, quantize_onnx
from graphprune.passes.quantize_plan import Timing
from onnx_builders import residual_onnx, save

FAST = ("--min-time", "0.001", "--min-runs", "3", "--no-progress")
DATA = ("--mean", "0.5", "--std", "0.25")  # one value per channel of the 4-channel model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The float model, an int8 copy of it, 40 and 24 random (8, 8, 4) images."""
    folder = tmp_path_factory.mktemp("profile_int8")
    model = save(residual_onnx(), folder / "float.onnx")
    int8 = folder / "int8.onnx"
    onnx.save(quantize_onnx(residual_onnx(), torch.randn(16, 4, 8, 8), QuantConfig()), str(int8))
    rng = np.random.default_rng(0)
    for name, count in (("tiny.npz", 40), ("small.npz", 24)):
        np.savez(folder / name, images=rng.integers(0, 256, (count, 8, 8, 4), dtype=np.uint8))
    return {"float": model, "int8": str(int8), "tiny": str(folder / "tiny.npz"), "small": str(folder / "small.npz")}


def fake_timings(monkeypatch, cuts: dict[str, float]) -> list[str]:
    """Every int8 model timed against the float one cuts ``cuts[its label]`` (a 2 ms float model;
    7-bit weights, where this CPU needs them, alike); returns the labels timed, in order."""
    timed = []

    def cut(proto, images, settings):
        def measure(quantized):
            label = quantization_info(quantized)["config"]["label"]
            timed.append(label)
            value = cuts[label.replace("-7bit", "")]
            return Timing(value, 2.0, 2.0 * (1 - value))
        return measure
    monkeypatch.setattr(onnxruntime_int8, "onnxruntime_cut", cut)
    return timed


def one_line_error(result, expected: str, exit_code: int = 1) -> None:
    code, out, err = result
    lines = [line for line in err.strip().splitlines() if line]
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err and not out, err
    assert expected in lines[0], lines[0]


def profile_json(cli, files, mode: str) -> dict:
    """``graphprune profile FLOAT --quantize MODE --data TINY --json``, which must succeed."""
    code, out, err = cli("profile", files["float"], "--quantize", mode, "--data", files["tiny"], *DATA, *FAST, "--json")
    assert code == 0, err
    return json.loads(out)


def test_auto_plans_as_optimize_does_and_times_the_chosen_int8_model(cli, files, monkeypatch):
    cuts = {"qdq-u8s8": 0.30, "qdq-s8s8": 0.10, "qoperator-u8s8": 0.40, "qoperator-s8s8": 0.20,
            "qoperator-u8s8+float:first_conv": 0.41,  # within noise (0.02) of 0.40: not kept
            "qoperator-u8s8+float:classifier": 0.45,  # kept
            "qoperator-u8s8+float:classifier+float:add_concat": 0.46}  # within noise of 0.45: not kept
    timed = fake_timings(monkeypatch, cuts)
    doc = profile_json(cli, files, "auto")
    section = doc["quantization"]
    chosen = section["config"]["label"]
    assert chosen.startswith("qoperator-u8s8") and chosen.endswith("+float:classifier") and section["used"]
    assert section["plan"]["chosen"]["label"] == chosen and "fastest within the accuracy bound" in section["reason"]
    assert len(section["plan"]["candidates"]) == 4 + 3  # the four formats/types, then each float group it has
    assert timed[-1] == chosen and (doc["float_ms"], doc["int8_ms"], doc["cut"]) == pytest.approx((2.0, 1.1, 0.45))
    assert section["float_nodes"] == ["/fc/Gemm"] and section["calibration_images"] == 40
    agreement = section["against_float_on_tiny_set"]
    assert agreement["images"] == 40 and set(agreement) == {"images", "relative_error", "top1_agreement"}
    assert doc["settings"]["backend"] == "onnxruntime" and doc["settings"]["threads"] == 1
    code, text, err = cli("profile", files["float"], "--quantize", "auto", "--data", files["tiny"], *DATA, *FAST)
    assert code == 0, err
    assert "7 candidates measured" in text and f"chosen: {chosen} (qoperator format" in text
    assert "left in float: /fc/Gemm" in text and "cut 45.0%" in text and "on 40 tiny images" in text


def test_auto_leaves_it_float_where_nothing_pays_and_int8_takes_the_fastest(cli, files, monkeypatch):
    cuts = {"qdq-u8s8": -0.10, "qdq-s8s8": -0.30, "qoperator-u8s8": -0.05, "qoperator-s8s8": -0.20}
    timed = fake_timings(monkeypatch, cuts)
    doc = profile_json(cli, files, "auto")
    section = doc["quantization"]
    assert not section["used"] and "no faster than the float model" in section["reason"] and "cut" not in doc
    assert len(timed) == 4  # the candidates only: nothing is timed after a plan that chose float
    doc = profile_json(cli, files, "int8")
    assert doc["quantization"]["config"]["label"].startswith("qoperator-u8s8") and doc["cut"] == -0.05
    assert "used as asked" in doc["quantization"]["reason"]


def test_a_given_config_is_timed_without_planning(cli, files):
    # real timing: only the form of the figures is asserted
    code, out, err = cli("profile", files["float"], "--quant-config", "qdq-u8s8+float:first_conv",
                         "--data", files["small"], *DATA, *FAST, "--json")
    assert code == 0, err
    doc = json.loads(out)
    section = doc["quantization"]
    assert section["plan"] is None and section["given"] == "qdq-u8s8+float:first_conv"
    assert section["config"]["fmt"] == "qdq" and section["config"]["float_groups"] == ["first_conv"]
    assert section["float_nodes"] == ["/block/conv1/Conv"]  # the first conv, found in this graph
    assert all(math.isfinite(doc[k]) and doc[k] > 0 for k in ("float_ms", "int8_ms"))
    assert doc["cut"] == pytest.approx(1 - doc["int8_ms"] / doc["float_ms"])
    assert section["against_float_on_tiny_set"]["relative_error"] < 0.1


@pytest.mark.parametrize("args, expected, exit_code", [
    (("--quantize", "int8", "--backend", "torch"), "int8 quantisation is timed and written for onnxruntime", 1),
    (("--quantize", "int8", "--device", "cuda"), "for GPU targets quantize 'auto' plans fp16 (float16) instead", 1),
    (("--quantize", "int8", "--num-samples", "12"), "at least 16 images in the tiny set, got 12", 1),
    (("--quantize", "int8", "--data", None), "--quantize needs --data", 2),
    (("--quantize", "auto", "--quant-config", "qdq-u8s8"), "give one of them", 2),
    (("--quant-config", "qdq-u8"), "--quant-config 'qdq-u8' names no quantisation config", 1),
    (("--quantize", "int8", "--per-block"), "--per-block", 2),
])
def test_int8_profile_refuses_in_one_line_before_timing(cli, files, monkeypatch, args, expected, exit_code):
    monkeypatch.setattr(onnxruntime_int8, "onnxruntime_cut", lambda *a: pytest.fail("timed before refusing"))
    data = ["--data", files["tiny"]]
    if "--data" in args:
        at = args.index("--data")
        data = [] if args[at + 1] is None else ["--data", files["small"]]
        args = args[:at] + args[at + 2:]
    one_line_error(cli("profile", files["float"], *args, *data, *DATA, *FAST), expected, exit_code)


def test_auto_on_a_cuda_target_without_the_cuda_provider_is_one_line(cli, files):
    """auto plans float16 for a GPU target, timed there: without onnxruntime's CUDA provider that is
    refused in one line before anything is quantised."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the float16 plan would run")
    one_line_error(cli("profile", files["float"], "--quantize", "auto", "--device", "cuda", "--data", files["tiny"],
                       *DATA, *FAST), "needs onnxruntime's CUDAExecutionProvider", 1)


def test_an_int8_file_is_profiled_as_it_is(cli, files):
    assert is_quantized(onnx.load(files["int8"])) and not is_quantized(onnx.load(files["float"]))
    code, out, err = cli("profile", files["int8"], "--batch-size", "2", *FAST, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["int8_file"] and doc["latency_ms"]["runs"] >= 3 and doc["blocks"] == []
    assert doc["settings"]["batch_size"] == 2 and doc["settings"]["backend"] == "onnxruntime"
    code, out, err = cli("profile", files["int8"], *FAST)
    assert code == 0 and "latency: median" in out and "an int8 ONNX file, timed as it is" in out, err
    one_line_error(cli("profile", files["int8"], "--per-block", *FAST), "already quantised")
    one_line_error(cli("profile", files["int8"], "--quantize", "int8", "--data", files["tiny"], *DATA, *FAST),
                   "already quantised")
    one_line_error(cli("profile", files["int8"], "--backend", "torch", *FAST), "use --backend onnxruntime")


def test_a_label_names_the_config_it_was_made_from():
    for config in QuantizeSettings().candidates():
        for variant in (config, QuantConfig(config.fmt, config.activations, config.weights, float_groups=("classifier",),
                                            reduce_range=True)):
            parsed = QuantConfig.from_label(variant.label)
            assert parsed.label == variant.label and parsed.float_groups == variant.float_groups
    assert QuantConfig.from_label("qdq-u8s8").reduce_range is None  # the CPU decides, as for a plan's candidates
