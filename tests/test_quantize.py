"""Static int8 quantisation (graphprune.passes.quantize) and the int8 latency backend: small
hand-made models, few images, no timing assertions (fake ``measure`` callables decide)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphprune.backends import LatencySettings
from graphprune.backends.onnxruntime_int8 import QuantizedOnnxRuntime, onnxruntime_cut
from graphprune.errors import GraphpruneError
from graphprune.formats.io_onnx import load_proto
from graphprune.formats.model_io import to_onnx
from graphprune.formats.ort_run import cpu_session, run_outputs
from graphprune.passes import drop_blocks, find_blocks
from graphprune.passes.float16 import to_float16
from graphprune.passes.float_groups import float_group_nodes
from graphprune.passes import calibration
from graphprune.passes.calibration import (HISTOGRAM_MEMORY_SHARE, MIN_CALIBRATION_IMAGES, Calibrated, activation_bytes,
                                           histogram_images)
from graphprune.passes.quantize import QuantConfig, QuantizeSettings, quantization_info, quantize_onnx
from graphprune.passes.quantize_plan import Timing, plan_quantization
from onnx_builders import channels_last_residual
from yolo_like import tiny_yolo5_onnx, tiny_yolo_onnx


def convnet(opset: int = 13, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """X (batch, 3, 16, 16) -> stem Conv -> Relu -> [Conv -> Relu -> Conv] + -> Relu -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [init("w0", 8, 3, 3, 3), init("b0", 8, scale=0.1), init("w1", 8, 8, 3, 3, scale=0.15),
             init("w2", 8, 8, 3, 3, scale=0.15), init("fc", classes, 8), init("fcb", classes, scale=0.1)]
    nodes = [
        helper.make_node("Conv", ["X", "w0", "b0"], ["c0"], name="/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="/stem/Relu"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="/block/conv1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/block/Relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/block/conv2/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r0"], ["s"], name="/block/Add"),
        helper.make_node("Relu", ["s"], ["r2"], name="/block/Relu_1"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="/pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["Y"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def images(n: int, shape=(3, 16, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def outputs(proto, x) -> np.ndarray:
    return run_outputs(cpu_session(proto), torch.as_tensor(x), 16)


def op_types(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one_line(exc) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("fmt, marker", [("qdq", "QuantizeLinear"), ("qoperator", "QLinearConv")])
def test_quantised_structure_and_outputs_close_to_float(fmt, marker):
    proto, x = convnet(), images(48)
    q = quantize_onnx(proto, x[:32], QuantConfig(fmt=fmt))
    assert marker in op_types(q) and "DequantizeLinear" in op_types(q)
    assert quantization_info(q)["config"]["label"].startswith(f"{fmt}-u8s8") and quantization_info(q)["opset"] == 13
    float_out, quant_out = outputs(proto, x[32:]), outputs(q, x[32:])
    assert relative_error(quant_out, float_out) < 0.05
    assert (quant_out.argmax(1) == float_out.argmax(1)).mean() >= 0.9


def test_per_channel_weights_have_one_scale_per_output_channel():
    q = quantize_onnx(convnet(), images(16), QuantConfig())
    scales = {t.name: t for t in q.graph.initializer}
    conv_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w1")]
    assert conv_dq and tuple(scales[conv_dq[0].input[1]].dims) == (8,)


def test_float_groups_stay_float_ops():
    proto = convnet()
    assert float_group_nodes(proto, "first_conv") == ["/stem/Conv"]
    assert float_group_nodes(proto, "classifier") == ["/fc/Gemm"]
    assert float_group_nodes(proto, "add_concat") == ["/block/Add"]
    q = quantize_onnx(proto, images(16), QuantConfig(fmt="qoperator", float_groups=("first_conv", "classifier")))
    by_name = {n.name: n for n in q.graph.node}
    assert by_name["/stem/Conv"].op_type == "Conv" and by_name["/fc/Gemm"].op_type == "Gemm"
    assert "QLinearConv" in op_types(q)  # the other convs are still quantised
    q = quantize_onnx(proto, images(16), QuantConfig(fmt="qdq", float_groups=("first_conv",)))
    dequantized = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    stem = next(n for n in q.graph.node if n.name == "/stem/Conv")
    assert not dequantized & set(stem.input)
    conv2 = next(n for n in q.graph.node if n.name == "/block/conv2/Conv")
    assert set(conv2.input) <= dequantized
    assert quantization_info(q)["float_nodes"] == ["/stem/Conv"]


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_with_a_remainder_batch(method):
    """onnxruntime's histogram methods stack every batch into one array: 40 images in batches of
    16 (16, 16, 8) failed with "inhomogeneous shape"; the remainder is now left out, and said."""
    proto, x = convnet(), images(40)
    prepared = Calibrated(proto, x, batch_size=16)
    q = quantize_onnx(prepared, config=QuantConfig(method=method))
    assert quantization_info(q)["calibration_images"] == 32
    assert relative_error(outputs(q, x), outputs(proto, x)) < 0.2
    minmax = quantize_onnx(prepared, config=QuantConfig())
    assert quantization_info(minmax)["calibration_images"] == 40


def test_histogram_calibration_reads_only_the_images_whose_activations_fit_in_memory(monkeypatch):
    """onnxruntime's histogram methods hold every image's activations at once (PP-OCRv4's recogniser,
    about 200 MB an image, was killed for memory with 200 text lines): they read the images that fit."""
    proto = convnet()
    per_image = activation_bytes(proto)
    assert per_image == 4 * (7 * 8 * 16 * 16 + 2 * 8)  # the 7 maps and 2 pooled vectors computed from X
    fitting = lambda n: int(n * per_image / HISTOGRAM_MEMORY_SHARE)  # noqa: E731 - memory that holds n images
    assert histogram_images(proto, 200, available=fitting(40)) == 40
    assert histogram_images(proto, 200, available=per_image) == MIN_CALIBRATION_IMAGES
    assert histogram_images(proto, 30, available=fitting(1000)) == 30
    prepared = Calibrated(proto, images(64), batch_size=16)
    monkeypatch.setattr(calibration, "available_memory", lambda: fitting(20) * activation_bytes(prepared.graph(13)[0])
                        // per_image)
    q = quantize_onnx(prepared, config=QuantConfig(method="percentile"))
    assert quantization_info(q)["calibration_images"] == 16  # 20 fit; whole batches of 16
    assert quantization_info(quantize_onnx(prepared, config=QuantConfig()))["calibration_images"] == 64  # MinMax: all


@pytest.mark.parametrize("fmt, opset", [("qdq", 13), ("qoperator", 12)])
def test_opset12_model_quantises_and_loads(fmt, opset):
    """PP-OCRv4's detector case: per-channel QDQ at opset 12 writes a DequantizeLinear with an
    axis onnxruntime refuses; it is converted to 13 (and says so); QOperator keeps 12."""
    proto, x = convnet(opset=12), images(40)
    q = quantize_onnx(proto, x[:24], QuantConfig(fmt=fmt))
    info = quantization_info(q)
    assert info["input_opset"] == 12 and info["opset"] == opset
    assert [o.version for o in q.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert any("converted to 13" in note for note in info["notes"]) == (opset == 13)
    assert relative_error(outputs(q, x[24:]), outputs(proto, x[24:])) < 0.05


def test_per_tensor_keeps_opset12():
    q = quantize_onnx(convnet(opset=12), images(16), QuantConfig(per_channel=False))
    assert quantization_info(q)["opset"] == 12 and quantization_info(q)["notes"] == []


def test_channels_last_input_is_fed_in_its_own_layout():
    proto, x = channels_last_residual(), images(24, (8, 8, 3))
    q = quantize_onnx(proto, torch.as_tensor(x).permute(0, 3, 1, 2), QuantConfig())
    assert q.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 3
    got = cpu_session(q).run(None, {"nhwc": x})[0]
    want = cpu_session(proto).run(None, {"nhwc": x})[0]
    assert relative_error(got, want) < 0.1


def test_one_calibration_serves_every_format():
    prepared = Calibrated(convnet(), images(16))
    first = quantize_onnx(prepared, config=QuantConfig(fmt="qdq"))
    prepared.images = torch.zeros_like(prepared.images)  # would give other ranges if calibrated again
    again = quantize_onnx(prepared, config=QuantConfig(fmt="qdq"))
    scales = lambda q: {t.name: numpy_helper.to_array(t).tolist() for t in q.graph.initializer if t.name.endswith("_scale")}
    assert scales(first) == scales(again)


def test_taken_ranges_cover_the_tensors_both_graphs_name_and_the_graphs_own_the_rest():
    """Quantisation-aware mimicking quantises the trained graph with the original's ranges; a
    tensor only the trained graph names (PP-OCRv4's detector: a Conv output that pre-processing
    fused away in the original) gets its own instead of failing with a KeyError."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    original = convnet()
    trained = onnx.ModelProto()
    trained.CopyFrom(original)
    for init in trained.graph.initializer:  # other weights: other ranges
        if init.name == "w0":
            init.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(init), "w0"))
    for node in trained.graph.node:  # and one tensor named otherwise
        node.output[:] = ["k0" if o == "c0" else o for o in node.output]
        node.input[:] = ["k0" if i == "c0" else i for i in node.input]
    before, own = Calibrated(original, images(16)), Calibrated(trained, images(16))
    after = Calibrated(trained, images(16))
    after.take_ranges(before)
    quantized = quantize_onnx(after, config=QuantConfig(fmt="qdq"))
    assert "QuantizeLinear" in op_types(quantized)
    ranges, theirs, mine = (load_tensors_data(c.ranges_file(13, "minmax")) for c in (after, before, own))
    assert "k0" not in theirs and ranges["k0"].range_value == mine["k0"].range_value
    assert ranges["r0"].range_value == theirs["r0"].range_value != mine["r0"].range_value


def test_error_calibration_set_too_small():
    with pytest.raises(GraphpruneError) as exc:
        quantize_onnx(convnet(), images(8), QuantConfig())
    assert "at least 16 images" in one_line(exc) and exc.value.parameter == "calibration"


def test_error_fixed_batch_larger_than_the_images():
    """A file whose input fixes a batch of 32, given fewer images: no whole batch to run (a ValueError
    from numpy before); one line naming the batch."""
    proto = convnet()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    with pytest.raises(GraphpruneError) as exc:
        plan_quantization(proto, images(20), images(20), SETTINGS, fake_measure({"*": 0.3}))
    assert "fixes a batch of 32 images: give at least 32, got 16" in one_line(exc)  # 16: SETTINGS caps them


def test_error_int8_for_cuda():
    with pytest.raises(GraphpruneError) as exc:
        quantize_onnx(convnet(), images(16), QuantConfig(), device="cuda")
    assert "TensorRT" in one_line(exc) and "quantize 'auto' plans fp16" in str(exc.value)
    QuantizeSettings(device="cuda").check()  # settings for a GPU target: their candidate is float16


def test_error_model_onnxruntime_cannot_quantise_names_the_node():
    proto = convnet()
    proto.graph.node[1].op_type, proto.graph.node[1].domain = "Mystery", "com.example"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(GraphpruneError) as exc:
        quantize_onnx(proto, images(16), QuantConfig())
    text = one_line(exc)
    assert "cannot quantise" in text and "/stem/Relu" in text and "Mystery" in text


def test_error_refused_model_is_never_returned(monkeypatch):
    import graphprune.passes.quantize as quantize

    real = quantize.cpu_session

    def refuse_quantised(proto, what="the model"):
        if isinstance(proto, onnx.ModelProto) and "QuantizeLinear" in op_types(proto):
            raise GraphpruneError(f"onnxruntime refuses {what}: Unrecognized attribute: axis")
        return real(proto, what)

    monkeypatch.setattr(quantize, "cpu_session", refuse_quantised)
    with pytest.raises(GraphpruneError) as exc:
        quantize_onnx(convnet(opset=12), images(16), QuantConfig())
    assert "refuses the quantised model" in one_line(exc)


def test_error_unknown_setting():
    with pytest.raises(GraphpruneError) as exc:
        QuantizeSettings(formats=("int4",)).check()
    assert exc.value.parameter == "formats" and "int4" in one_line(exc)


def test_to_float16_keeps_float32_io_and_matches():
    proto, x = convnet(), images(8)
    half = to_float16(proto)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    assert relative_error(outputs(half, x), outputs(proto, x)) < 1e-2


def test_the_fp16_config_makes_a_float16_model_with_its_float_groups_in_float32():
    """The config a GPU target plans (structural: float16 weights but the classifier's, labelled in
    its metadata as int8 models are; numerical: float16's rounding only). No calibration images."""
    config = QuantConfig.from_label("fp16+float:classifier")
    assert config == QuantConfig.half(("classifier",)) and config.label == "fp16+float:classifier" and config.is_half
    assert QuantizeSettings(device="cuda").candidates() == [QuantConfig.half()]
    proto, x = convnet(), images(8)
    half = quantize_onnx(proto, None, config, device="cuda")
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types["fc"] == types["fcb"] == TensorProto.FLOAT  # the classifier's Gemm stays float32
    assert types["w1"] == types["w2"] == TensorProto.FLOAT16
    assert quantization_info(half)["config"]["label"] == "fp16+float:classifier"
    assert quantization_info(half)["float_nodes"] == ["/fc/Gemm"]
    assert 0 < relative_error(outputs(half, x), outputs(proto, x)) < 1e-2


def test_a_cuda_target_plans_float16_by_the_same_measurement_and_judge():
    """On a CUDA device the plan's one candidate is float16: kept where it measures faster within the
    bound (float groups tried on it as on int8), left off where it measures no faster."""
    settings = QuantizeSettings(max_calibration_images=16, batch_size=16, device="cuda")
    measure = fake_measure({"fp16": 0.4, "*": 0.3})
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), settings, measure)
    assert plan.config == QuantConfig.half() and plan.chosen.agreement == 1.0
    assert measure.seen[0] == "fp16" and all(label.startswith("fp16") for label in measure.seen)
    assert any(t.data_type == TensorProto.FLOAT16 for t in plan.proto.graph.initializer)
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), settings, fake_measure({"*": -0.2}))
    assert plan.config is None and "no faster than the float model" in plan.reason


# ----------------------------------------------------------------------------------------------
# plan_quantization with fake measurements

def fake_measure(cuts: dict[str, float]):
    """A ``measure`` that reads the candidate's label from its metadata and looks its cut up."""
    seen = []

    def measure(proto):
        label = quantization_info(proto)["config"]["label"].replace("-7bit", "")  # this CPU's choice
        seen.append(label)
        return Timing(cuts.get(label, cuts.get("*", 0.0)), 1.0, 1.0 - cuts.get(label, 0.0))

    measure.seen = seen
    return measure


SETTINGS = QuantizeSettings(max_calibration_images=16, batch_size=16)


def test_one_slow_float_run_does_not_make_a_slower_candidate_the_fastest():
    """ResNet-18 at 64 px: the first conv in float was timed with its float pair at 9.3 ms where
    the others' ran at 5.0, so its cut read 82% and it was kept as 'fastest'; the file gave 70%."""
    def measure(proto):
        label = quantization_info(proto)["config"]["label"].replace("-7bit", "")
        if label == "qdq-u8s8+float:first_conv":
            return Timing(1 - 1.66 / 9.29, 9.29, 1.66)  # the noisy pair
        return Timing(1 - 1.21 / 5.0, 5.0, 1.21) if label == "qdq-u8s8" else Timing(1 - 1.5 / 5.0, 5.0, 1.5)

    settings = QuantizeSettings(max_calibration_images=16, batch_size=16, max_top1_drop=0.5,
                                float_groups=("first_conv",))
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), settings, measure, labels=None)
    assert plan.config.label.replace("-7bit", "") == "qdq-u8s8"
    assert plan.reason.endswith(f"cut {1 - 1.21 / 5.0:.1%}")


def test_plan_picks_the_faster_candidate():
    measure = fake_measure({"qdq-u8s8": 0.5, "qoperator-u8s8": 0.3, "*": 0.2})
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, measure)
    assert (plan.config.fmt, plan.config.activations) == ("qdq", "uint8") and plan.proto is not None
    assert measure.seen[:4] == ["qdq-u8s8", "qdq-s8s8", "qoperator-u8s8", "qoperator-s8s8"]
    assert len(plan.to_dict()["candidates"]) == len(measure.seen) and plan.metric == "disagreement"
    assert plan.chosen.agreement >= 0.9
    assert plan.chosen.relative_error < 0.05


def test_plan_leaves_untried_the_candidates_that_would_end_past_its_time_limit(monkeypatch):
    """Each candidate takes 10 s on a fake clock; with 25 s the second ends at 20 s and a third would
    end at 30 s: two measured, the rest (two more formats, every float group) untried and counted
    in the reason. The first runs even with no time at all: a plan needs one measurement."""
    from graphprune.passes import quantize_plan

    clock, cuts = [0.0], fake_measure({"qdq-u8s8": 0.3, "qdq-s8s8": 0.5, "*": 0.4})

    def measure(proto):
        clock[0] += 10.0
        return cuts(proto)

    monkeypatch.setattr(quantize_plan.time, "perf_counter", lambda: clock[0])
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, measure, max_seconds=25.0)
    assert cuts.seen == ["qdq-u8s8", "qdq-s8s8"] and len(plan.candidates) == 2
    assert plan.config.label.replace("-7bit", "") == "qdq-s8s8"  # the faster of the two measured
    untried = 2 + sum(bool(float_group_nodes(convnet(), group)) for group in SETTINGS.float_groups)
    assert plan.reason.endswith(f"{untried} candidate(s) left untried: another would have ended past planning's "
                                "time limit of 25 s")
    cuts.seen.clear()
    assert plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, measure, max_seconds=0.0).config
    assert len(cuts.seen) == 1
    cuts.seen.clear()
    plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, measure)
    assert len(cuts.seen) == 4 + untried - 2  # no limit: every candidate, float groups on the chosen one


def test_plan_with_labels_returns_none_when_no_candidate_is_within_the_bound():
    """Labels the float model gets all right (top-1 1.0): a bound no candidate can meet leaves
    quantisation off; a loose one takes the fastest (int8 activations, made 'faster' here)."""
    proto, holdout = convnet(), images(32, seed=1)
    labels = outputs(proto, holdout).argmax(1)
    measure = fake_measure({"qdq-s8s8": 0.6, "*": 0.3})
    settings = QuantizeSettings(max_calibration_images=16, batch_size=16, max_top1_drop=-0.5, float_groups=())
    plan = plan_quantization(proto, images(16), holdout, settings, measure, labels=labels)
    assert plan.proto is None and "accuracy bound (top1_drop -0.5; the closest, " in plan.reason
    assert all(c.loss == pytest.approx(1.0 - c.top1) for c in plan.candidates)  # the float model gets all right
    assert plan.float_top1 == 1.0 and all(not c.within_bound for c in plan.candidates)
    settings = QuantizeSettings(max_calibration_images=16, batch_size=16, max_top1_drop=0.5, float_groups=())
    plan = plan_quantization(proto, images(16), holdout, settings, fake_measure({"qdq-s8s8": 0.6, "*": 0.3}),
                             labels=labels)
    assert (plan.config.fmt, plan.config.activations) == ("qdq", "int8")


def test_labels_the_float_model_mostly_misses_are_not_used_to_bound_top1():
    """Class folders from another domain give indices that are not the model's classes: top-1 near
    0 for the float and int8 models alike would pass any int8; agreement judges instead, and says why."""
    proto, x = convnet(), images(32, seed=1)
    foreign = (outputs(proto, x).argmax(1) + 1) % 10  # never the model's top class
    plan = plan_quantization(proto, images(16), x, SETTINGS, fake_measure({"*": 0.3}), labels=foreign)
    assert plan.metric == "disagreement" and plan.float_top1 is None
    assert "labels not used: the float model gets 0% of them right" in plan.reason
    own = outputs(proto, x).argmax(1)
    assert plan_quantization(proto, images(16), x, SETTINGS, fake_measure({"*": 0.3}), labels=own).metric == "top1_drop"


def test_a_loss_of_exactly_the_bound_is_within_it_despite_float_rounding():
    """EfficientNet-Lite0's int8 lost 2 of its 200 tiny photos: 177/200 - 175/200 is
    0.010000000000000009 in floats, which a plain <= 0.01 refused."""
    from graphprune.passes.quantize_plan import _Judge

    proto, x = convnet(), torch.as_tensor(images(16))
    judge = _Judge(proto, x, outputs(proto, x).argmax(1), QuantizeSettings(max_top1_drop=0.01))
    assert 177 / 200 - 175 / 200 > 0.01 and judge.within(177 / 200 - 175 / 200)
    assert not judge.within(0.0101) and judge.metric == "top1_drop"


def test_a_recogniser_is_judged_by_the_text_it_reads():
    """A character's boundary moved by one position reads the same text: the per-position judge
    counted it a change (PP-OCRv4 rec's int8: the same tops on 3% of lines, the same text on 32%)."""
    from types import SimpleNamespace

    from graphprune.passes.quantize_plan import _Judge

    reference = torch.eye(5)[torch.tensor([[0, 3, 3, 0, 0, 4], [0, 1, 0, 0, 2, 0]])]
    moved = torch.eye(5)[torch.tensor([[0, 0, 3, 3, 0, 4], [0, 1, 0, 0, 0, 0]])]
    assert _Judge._agrees(SimpleNamespace(layout="sequence"), moved, reference).tolist() == [True, False]
    assert _Judge._agrees(SimpleNamespace(layout="classes"), moved, reference).tolist() == [False, False]


def test_plan_rejects_the_fastest_when_it_alone_is_inaccurate(monkeypatch):
    import graphprune.passes.quantize_plan as quantize_plan

    real = quantize_plan._Judge.evaluate

    def evaluate(self, prepared, config, measure):
        candidate = real(self, prepared, config, measure)
        if config.fmt == "qoperator":
            candidate.within_bound = False
        return candidate

    monkeypatch.setattr(quantize_plan._Judge, "evaluate", evaluate)
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), QuantizeSettings(
        max_calibration_images=16, batch_size=16, float_groups=()), fake_measure({"qoperator-u8s8": 0.7, "*": 0.2}))
    assert plan.config.fmt == "qdq"


def test_over_the_bound_a_float_group_that_brings_it_within_is_kept(monkeypatch):
    """Every plain candidate over the bound, the first conv in float within it (by no more than
    noise on the held-out images): the plan keeps it rather than leave int8 off."""
    import graphprune.passes.quantize_plan as quantize_plan

    real = quantize_plan._Judge.evaluate

    def evaluate(self, prepared, config, measure):
        candidate = real(self, prepared, config, measure)
        candidate.within_bound = "first_conv" in config.float_groups
        return candidate

    monkeypatch.setattr(quantize_plan._Judge, "evaluate", evaluate)
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, fake_measure({"*": 0.3}))
    assert plan.proto is not None and "first_conv" in plan.config.float_groups and plan.chosen.within_bound
    assert not plan.candidates[0].within_bound


def test_where_float_groups_cannot_save_the_fastest_the_next_fastest_is_tried(monkeypatch):
    import graphprune.passes.quantize_plan as quantize_plan

    real = quantize_plan._Judge.evaluate

    def evaluate(self, prepared, config, measure):
        candidate = real(self, prepared, config, measure)
        candidate.within_bound = config.fmt == "qdq" and "first_conv" in config.float_groups
        return candidate

    monkeypatch.setattr(quantize_plan._Judge, "evaluate", evaluate)
    measure = fake_measure({"qoperator-u8s8": 0.5, "qdq-u8s8": 0.45, "*": 0.3})
    settings = QuantizeSettings(max_calibration_images=16, batch_size=16, float_groups=("first_conv",))
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), settings, measure)
    assert plan.config.label.startswith("qdq-u8s8+float:first_conv") and plan.chosen.within_bound
    assert measure.seen[4:] == ["qoperator-u8s8+float:first_conv", "qdq-u8s8+float:first_conv"]


def test_plan_returns_none_when_every_candidate_is_slower():
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, fake_measure({"*": -0.4}))
    assert plan.proto is None and plan.config is None and "no faster" in plan.reason
    assert plan.to_dict()["chosen"] is None and len(plan.candidates) == 4


def test_plan_keeps_a_float_group_only_when_it_measures_faster():
    measure = fake_measure({"qdq-u8s8": 0.4, "qdq-u8s8+float:first_conv": 0.5,
                            "qdq-u8s8+float:first_conv+float:classifier": 0.3, "*": 0.1})
    plan = plan_quantization(convnet(), images(16), images(32, seed=1), SETTINGS, measure)
    assert plan.config.float_groups == ("first_conv",)
    assert measure.seen[4:] == ["qdq-u8s8+float:first_conv", "qdq-u8s8+float:first_conv+float:classifier",
                                "qdq-u8s8+float:first_conv+float:add_concat"]  # no decode nodes after its Gemm
    assert plan.to_dict()["float_nodes"][0] == "/stem/Conv"


def test_a_detector_is_judged_by_its_detections_not_by_its_boxes():
    """A YOLOv8-style head concatenates boxes in pixels with class scores in [0, 1]: int8 with one
    scale for both keeps the output's relative error under 1% yet changes the detections; the plan
    judges the detections (mAP50 with the float model's as the truth, fidelity.py), so it keeps the
    concatenations in float."""
    proto = tiny_yolo_onnx(size=64, reg=16, score_bias=-1.5)
    x = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plan = plan_quantization(proto, x[:16], x[16:], SETTINGS, fake_measure({"*": 0.3}))
    assert plan.metric == "map50_drop"
    plain = plan.candidates[0]
    assert plain.config.float_groups == () and plain.relative_error < 0.02 and not plain.within_bound
    # plain int8 ranks the float model's detections well (map50 0.98) but adds a third new confident
    # ones, which the float model does not make at any score: the reverse mAP50 refuses it
    assert plain.detections["map50"] > 0.95 and plain.detections["map50_reverse"] < 0.95
    assert min(plan.chosen.detections["map50"], plan.chosen.detections["map50_reverse"]) >= 0.95
    assert "add_concat" in plan.config.float_groups or "decode" in plan.config.float_groups


def test_a_yolov5_style_detector_is_judged_by_its_detections_too():
    proto = tiny_yolo5_onnx()
    x = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plan = plan_quantization(proto, x[:16], x[16:], SETTINGS, fake_measure({"*": 0.3}))
    assert plan.metric == "map50_drop"
    assert all(c.detections is not None and c.detections["original"] > 0 for c in plan.candidates if not c.error)


def text_map(seed: int = 0) -> onnx.ModelProto:
    """X (batch, 3, 16, 16) -> Conv -> Relu -> Conv -> Sigmoid: a (batch, 1, 16, 16) map, as a text detector's."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.4, (1, 8, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([-1.0], np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["X", "w0"], ["c0"], name="/conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="/relu"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="/conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["Y"], name="/sigmoid")]
    graph = helper.make_graph(nodes, "text_map", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 1, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_a_map_is_judged_by_the_iou_of_the_regions_it_marks():
    proto, x = text_map(), torch.as_tensor(images(48))
    settings = QuantizeSettings(max_calibration_images=32, batch_size=16)  # judged on all 32
    plan = plan_quantization(proto, x[:16], x[16:], settings, fake_measure({"*": 0.3}))
    assert plan.metric == "map_iou_drop" and plan.bound == settings.max_map_iou_drop
    reference = outputs(proto, x[16:])
    for candidate in plan.candidates:
        quantized = outputs(quantize_onnx(proto, x[:16], candidate.config), x[16:])
        expected = np.minimum(reference, quantized).sum() / np.maximum(reference, quantized).sum()
        assert candidate.map_iou == pytest.approx(float(expected), rel=1e-6) and 0.8 < expected < 1
        assert candidate.loss == pytest.approx(1 - candidate.map_iou)
        assert candidate.within_bound == (candidate.loss <= settings.max_map_iou_drop)


def recogniser(seed: int = 0) -> onnx.ModelProto:
    """X (batch, 3, 8, 10) -> Conv -> Relu -> mean over rows -> (batch, 10, 8) @ W -> Softmax: a class
    per position, as a CTC text recogniser's output."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 12)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([2], np.int64), "rows")]
    nodes = [helper.make_node("Conv", ["X", "w0"], ["c0"], name="/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="/relu"),
             helper.make_node("ReduceMean", ["r0", "rows"], ["m"], name="/mean", keepdims=0),
             helper.make_node("Transpose", ["m"], ["t"], name="/transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w1"], ["s"], name="/head"),
             helper.make_node("Softmax", ["s"], ["Y"], name="/softmax", axis=-1)]
    graph = helper.make_graph(nodes, "recogniser", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 8, 10])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 10, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_a_recogniser_is_judged_by_the_same_top_class_at_every_position():
    proto, x = recogniser(), torch.as_tensor(images(48, (3, 8, 10)))
    settings = QuantizeSettings(max_calibration_images=32, batch_size=16)
    labels = np.zeros(32, dtype=np.int64)  # an image's class means nothing to a recogniser: not used
    plan = plan_quantization(proto, x[:16], x[16:], settings, fake_measure({"*": 0.3}), labels=labels)
    assert plan.metric == "disagreement" and plan.float_top1 is None
    reference = outputs(proto, x[16:]).argmax(-1)
    for candidate in plan.candidates:
        quantized = outputs(quantize_onnx(proto, x[:16], candidate.config), x[16:]).argmax(-1)
        assert candidate.agreement == pytest.approx(float((quantized == reference).all(1).mean()))
        assert candidate.loss == pytest.approx(1 - candidate.agreement) and candidate.top1 is None


def test_decode_group_is_the_unweighted_nodes_after_the_last_weighted_ones():
    assert float_group_nodes(convnet(), "decode") == []  # the classifier's Gemm writes the output
    head = float_group_nodes(tiny_yolo_onnx(size=64, reg=16), "decode")
    assert head and all(n.startswith(("/head/", "Constant")) for n in head) and "/head/Sigmoid" in head
    assert not any("Conv" in n for n in head)


def test_onnxruntime_cut_measures_interleaved():
    proto = convnet()
    measure = onnxruntime_cut(proto, images(4), LatencySettings(min_runs=3, min_time_s=0.0, warmup_runs=1, warmup_s=0))
    timing = measure(quantize_onnx(proto, images(16), QuantConfig()))
    assert timing.float_ms > 0 and timing.quantized_ms > 0
    assert timing.cut == pytest.approx(1 - timing.quantized_ms / timing.float_ms)


def test_quantized_backend_runs_the_int8_model_of_any_model():
    model = load_proto(convnet())
    backend = QuantizedOnnxRuntime(images(16), QuantConfig(float_groups=("first_conv",)))
    settings = LatencySettings(batch_size=2)
    backend.prepare(model, settings)()
    assert backend.describe(settings)["quantization"]["float_groups"] == ["first_conv"]
    with pytest.raises(GraphpruneError):
        backend.prepare(model, LatencySettings(device="cuda"))


def test_quantized_backend_rederives_float_groups_after_block_dropping():
    model = load_proto(convnet())
    (block,) = find_blocks(model)
    smaller = drop_blocks(model, [block.name])
    backend = QuantizedOnnxRuntime(images(16), QuantConfig(float_groups=("add_concat", "classifier")))
    backend.prepare(smaller, LatencySettings())()
    assert float_group_nodes(to_onnx(smaller, verify=False), "add_concat") == []
    assert float_group_nodes(to_onnx(smaller, verify=False), "classifier") == ["/fc/Gemm"]
