"""Quantisation-aware mimicking (graphprune.passes.quantize_mimic): the rounding put into the fx
graph where onnxruntime quantises, how faithfully it reproduces onnxruntime's int8 model, the
training, and the plan's use of it. Small hand-made models; no timing assertions."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from graphprune.formats.io_onnx import load_proto
from graphprune.formats.model_io import to_onnx
from graphprune.formats.ort_run import cpu_session, run_outputs
from graphprune.passes.calibration import Calibrated
from graphprune.passes.quantize import QuantConfig, QuantizeSettings, quantization_info, quantize_onnx
from graphprune.passes.quantize_mimic import (TIMED_STEPS, MimicSettings, fake_quant_points, fake_quantize, mimic_quantized,
                                              round_weights, tensor_nodes, unround_weights, weight_rounding,
                                              with_fake_quant)
from graphprune.passes.quantize_plan import Timing, plan_quantization
from graphprune.features import mimic_loss, mimic_targets, target_names, truncate
from test_quantize import convnet, images

QDQ = QuantConfig.from_label("qdq-u8s8")


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _setup(label: str = "qdq-u8s8", n: int = 48):
    model = load_proto(convnet())
    x = torch.as_tensor(images(n))
    float_proto = to_onnx(model)
    return model, x, float_proto, quantize_onnx(float_proto, x, QuantConfig.from_label(label))


def test_every_quantised_activation_is_rounded_right_after_the_node_computing_it():
    model, x, _, quantized = _setup()
    points = fake_quant_points(quantized)
    # the input, each conv (its Relu folded into it), the merge, the pooled features, the output
    assert {"X", "Y"} <= set(points) and len(points) >= 6
    assert all(0 < p.scale and p.low == 0 and p.high == 255 for p in points.values())
    gm = model.graph_module
    nodes = tensor_nodes(gm, [spec.name for spec in model.inputs])
    assert set(points) <= set(nodes)
    rounded, inserted = with_fake_quant(gm, points, nodes)
    quants = [n for n in rounded.graph.nodes if n.target is fake_quantize]
    assert inserted == len(points) == len(quants)
    by_name = {n.name: n for n in rounded.graph.nodes}
    for name in points:
        computed = by_name[nodes[name].name]
        quant = next(n for n in quants if n.args[0] is computed)
        assert list(computed.users) == [quant]  # every reader reads the rounded value
        assert quant.args[1:] == (points[name].scale, points[name].zero_point, 0, 255)
    assert not any(n.target is fake_quantize for n in gm.graph.nodes)  # the model's own graph is untouched


def test_the_rounded_graph_reproduces_onnxruntimes_int8_model():
    """Activations and per-channel weights rounded as onnxruntime rounds them: the fx graph's output
    is far closer to the int8 model's than the float model's is (8-bit and 7-bit weights)."""
    for label in ("qdq-u8s8", "qdq-u8s8-7bit"):
        model, x, float_proto, quantized = _setup(label)
        gm = model.clone().graph_module
        clone = model.with_graph_module(gm)
        rounding = weight_rounding(quantized)
        assert set(rounding) == {"w0", "w1", "w2", "fc"}
        assert {steps for _, steps in rounding.values()} <= ({127} if label == "qdq-u8s8" else {63, 64})
        weights = round_weights(clone, gm, rounding)
        rounded, _ = with_fake_quant(gm, fake_quant_points(quantized), tensor_nodes(gm, ["X"]))
        with torch.no_grad():
            simulated = rounded(x).numpy()
        int8 = run_outputs(cpu_session(quantized), x, 16)
        reference = run_outputs(cpu_session(float_proto), x, 16)
        assert _relative(simulated, int8) < 0.5 * _relative(reference, int8)
        before = gm.n0.weight.detach().clone()  # the rounded view; the float weight stays underneath
        unround_weights(weights)
        assert not torch.equal(gm.n0.weight, before) and torch.equal(gm.n0.weight, model.graph_module.n0.weight)


def test_training_lowers_the_feature_error_under_int8_rounding_and_writes_a_plain_int8_model():
    model, x, _, quantized = _setup()
    settings = MimicSettings(steps=60, lr=1e-4, batch_size=16, precision="float32")
    trained, record = mimic_quantized(model, model, Calibrated(to_onnx(model), x), QDQ, settings)
    assert record["steps"] == 60 and record["rounded_in_training"] >= 6 and record["weights_rounded_in_training"] == 4
    targets = mimic_targets(model)

    def error_under_rounding(m) -> float:
        m = m.clone()
        gm = m.graph_module
        round_weights(m, gm, weight_rounding(quantized))
        rounded, _ = with_fake_quant(gm, fake_quant_points(quantized), tensor_nodes(gm, ["X"]))
        with torch.no_grad():
            student = truncate(rounded, target_names(rounded, targets))(x)
            teacher = truncate(model.graph_module, target_names(model.graph_module, targets))(x)
        return float(mimic_loss(student, teacher, [1.0]))

    # random weights and noise images: rounding noise the weights cannot learn away is most of it (-29% here)
    assert error_under_rounding(trained) < 0.9 * error_under_rounding(model)
    assert not any(n.target is fake_quantize for n in trained.graph_module.graph.nodes)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in trained.graph_module.modules())
    assert torch.equal(model.graph_module.n0.weight, load_proto(convnet()).graph_module.n0.weight)  # input untouched
    written = quantize_onnx(to_onnx(trained), x, QDQ)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in written.graph.node}
    assert run_outputs(cpu_session(written), x, 16).shape == (len(x), 10)


def test_a_time_limit_shortens_the_schedule_to_the_steps_that_fit():
    model, x, _, _ = _setup()
    calibrated = Calibrated(to_onnx(model), x)
    _, record = mimic_quantized(model, model, calibrated, QDQ, MimicSettings(steps=500, max_seconds=1e-6))
    assert record["steps"] == TIMED_STEPS and record["shortened_to_fit_seconds"] == 1e-6
    _, record = mimic_quantized(model, model, calibrated, QDQ, MimicSettings(steps=5, max_seconds=600.0))
    assert record["steps"] == 5 and "shortened_to_fit_seconds" not in record


def test_the_operator_form_is_trained_with_the_qdq_forms_rounding():
    model, x, _, _ = _setup()
    _, record = mimic_quantized(model, model, Calibrated(to_onnx(model), x), QuantConfig.from_label("qoperator-u8s8"),
                               MimicSettings(steps=2))
    assert record["rounded_in_training"] >= 6 and record["weights_rounded_in_training"] == 4


def _feature_net() -> onnx.ModelProto:
    """X (batch, 3, 16, 16) -> Conv -> Relu -> Conv -> Y: an output judged by its relative error."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("w0", (8, 3, 3, 3)), ("w1", (8, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["X", "w0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("Conv", ["r0", "w1"], ["Y"], name="c1", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "features", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_the_plan_mimics_the_closest_candidate_where_none_is_within_the_bound():
    float_proto, x = _feature_net(), torch.as_tensor(images(32))
    given = []

    def improve(candidate):
        given.append(candidate.config.label)
        return float_proto, {"steps": 3}  # "trained" to the float model itself: loses nothing

    def plan(bound):
        settings = QuantizeSettings(formats=("qdq",), activation_types=("uint8",), float_groups=(),
                                    max_relative_error=bound)
        return plan_quantization(float_proto, x, x, settings, lambda q: Timing(0.4), improve=improve)

    within = plan(1e-6)  # plain int8's relative error is about 1e-2: over the bound
    plain, mimicked = within.candidates
    assert given == ["qdq-u8s8"] and not plain.within_bound and plain.loss > 1e-3
    assert mimicked.config.label == "qdq-u8s8+mimic" and mimicked.timing.cut == 0.4 and mimicked.loss == 0
    assert mimicked.info["mimic"] == {"steps": 3}
    assert within.config == mimicked.config and within.proto is float_proto
    assert "within the accuracy bound after quantisation-aware mimicking (relative_error" in within.reason
    refused = plan(-1.0)  # nothing is within: the reason names the closest, now the mimicked one
    assert refused.config is None and "the closest, qdq-u8s8+mimic, 0.000" in refused.reason
    assert len(given) == 2
    plan(1.0)  # plain int8 within the bound: nothing is trained
    assert len(given) == 2


def test_labels_name_the_mimicked_config():
    config = QuantConfig.from_label("qdq-u8s8+float:add_concat+mimic")
    assert config.mimic and config.float_groups == ("add_concat",) and config.label == "qdq-u8s8+float:add_concat+mimic"
    assert not QuantConfig.from_label("qdq-u8s8").mimic


def test_quantize_result_trains_the_weights_where_the_plans_config_says_mimic():
    from graphprune.backends import LatencySettings
    from graphprune.data import TinySet
    from graphprune.optimize import OptimizeConfig, make_context
    from graphprune.passes import QuantizationPlan, QuantizeResult

    model = load_proto(convnet())
    tiny = TinySet(torch.as_tensor(images(32)), torch.full((32,), -1))
    config = OptimizeConfig(quantize="int8", quantization=QuantizeSettings(mimic_steps=5), show_progress=False,
                            holdout_minimum=4, latency=LatencySettings(min_time_s=0.05, warmup_s=0.02, min_runs=5))
    ctx = make_context(model, tiny, config)
    step = QuantizeResult.from_config(config)
    runs = {label: step(model, ctx, QuantizationPlan(None, QuantConfig.from_label(label), "given", "", 0.0, []))
            for label in ("qdq-u8s8", "qdq-u8s8+mimic")}
    plain, mimicked = runs["qdq-u8s8"], runs["qdq-u8s8+mimic"]
    assert plain.record["mimic"] is None and mimicked.record["mimic"]["steps"] == 5
    assert mimicked.record["config"]["label"] == "qdq-u8s8+mimic"
    weights = [{t.name: numpy_helper.to_array(t) for t in r.value.proto.graph.initializer} for r in (plain, mimicked)]
    assert not np.array_equal(weights[0]["w1_quantized"], weights[1]["w1_quantized"])  # trained, then quantised
    assert mimicked.value.agreement["relative_error"] < 0.1  # against the float model it was made from
    assert quantization_info(mimicked.value.proto)["mimic"]["steps"] == 5  # the file says how it was made
    assert fake_quant_points(mimicked.value.proto) == fake_quant_points(plain.value.proto)  # the ranges it learnt
    # where the plan trained this very model (no block dropped), its int8 model is written as it is
    planned = QuantizationPlan(mimicked.value.proto, QuantConfig.from_label("qdq-u8s8+mimic"), "planned", "", 0.0, [])
    again = step(model, ctx, planned)
    assert again.value.proto is mimicked.value.proto and again.record["mimic"]["steps"] == 5


def test_a_pace_that_drops_shortens_the_schedule_again(monkeypatch):
    """Sized once on the first steps, a schedule whose steps then slowed tenfold (a shared CPU)
    overran its limit (efficientnet_b0: 201 s for 149); the fit is redone after every step."""
    import graphprune.passes.quantize_mimic as qm

    clock = {"now": 0.0, "steps": 0}
    step = torch.optim.AdamW.step

    def slowing_step(self, *args, **kwargs):
        clock["steps"] += 1
        clock["now"] += 1.0 if clock["steps"] <= TIMED_STEPS else 10.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", slowing_step)
    monkeypatch.setattr(qm.time, "perf_counter", lambda: clock["now"])
    model, x, _, _ = _setup()
    _, record = mimic_quantized(model, model, Calibrated(to_onnx(model), x), QDQ,
                                MimicSettings(steps=500, max_seconds=30.0))
    assert record["shortened_to_fit_seconds"] == 30.0
    assert record["seconds"] <= 30.0 + 10.0  # at most the step that crossed the limit
