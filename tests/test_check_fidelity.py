"""check_fidelity (graphprune/passes/check_fidelity.py): the written model against the original on
the held-out tiny images, labels dropped; int8 file where one was made; a detector's detections."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphprune as gp
from graphprune.data import TinySet
from graphprune.optimize import OptimizeConfig, make_context
from graphprune.passes import CheckFidelity, HeldOutFidelity, QuantizedOnnx, find_blocks
from graphprune.passes.quantize import QuantConfig, quantize_onnx
from graphprune.passes.recover import RecoveryLog
from graphprune.passes.check_fidelity import poor_fidelity
from graphprune.report import _held_out_line, format_summary
from yolo_like import tiny_yolo_onnx


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    model = gp.load("zoo:cifar10_resnet20")
    tiny = TinySet(torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 10)
    return model, tiny


def test_the_original_against_itself_agrees_everywhere_and_nothing_changes(r20):
    model, tiny = r20
    ctx = make_context(model, tiny, OptimizeConfig())
    before = {k: v.clone() for k, v in model.graph_module.state_dict().items()}
    result = CheckFidelity()(model, ctx, RecoveryLog([], None, 0.0, trained_on_holdout=True))
    fidelity = result.value
    assert isinstance(fidelity, HeldOutFidelity) and fidelity.images == len(ctx.holdout) == 16
    assert fidelity.trained_on and fidelity.result["agreement"] == 1.0
    assert max(o["relative_error"] for o in fidelity.result["outputs"].values()) < 1e-6
    assert "top1" not in fidelity.result  # labels dropped: compared with the original only
    assert result.model is model and all(torch.equal(before[k], v) for k, v in model.graph_module.state_dict().items())
    assert "top-1 agreement 100.0%" in _held_out_line(fidelity.to_dict())
    assert "recovery trained on them too" in _held_out_line(fidelity.to_dict())


def test_a_pruned_model_is_compared_and_the_int8_file_is_what_is_judged(r20):
    model, tiny = r20
    ctx = make_context(model, tiny, OptimizeConfig())
    pruned = gp.drop_blocks(model, ["layer1.1", "layer2.1"], find_blocks(model))
    float_result = CheckFidelity()(pruned, ctx).value.result
    assert max(o["relative_error"] for o in float_result["outputs"].values()) > 1e-3
    proto = quantize_onnx(gp.to_onnx(model), tiny.images[:16], QuantConfig())
    int8 = CheckFidelity()(model, ctx, QuantizedOnnx(proto)).value
    error = max(o["relative_error"] for o in int8.result["outputs"].values())
    assert 0 < error < 0.2 and not int8.trained_on  # the int8 file, not the float model, was compared


def test_a_detector_reports_detections_kept(tmp_path):
    path = tmp_path / "yolo.onnx"
    onnx.save(tiny_yolo_onnx(size=64, reg=16, score_bias=-1.5), str(path))
    model = gp.load(str(path))
    tiny = TinySet(torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.full((40,), -1))
    ctx = make_context(model, tiny, OptimizeConfig())
    fidelity = CheckFidelity()(model, ctx).value
    (output,) = fidelity.result["outputs"].values()
    detections = output["detections"]
    assert detections["original"] > 0 and detections["kept"] == detections["original"] and detections["added"] == 0
    assert f"kept {detections['kept']} of {detections['original']} detections, added 0" in _held_out_line(
        fidelity.to_dict())


@pytest.mark.parametrize("output,warned", [
    ({"agreement": 0.5, "relative_error": 0.9}, "'y' agrees with the original's top class on 50%"),
    ({"agreement": 0.9, "relative_error": 0.9}, None),  # a classifier is judged by its top class
    ({"detections": {"map50": 0.9, "map50_reverse": 0.3}, "relative_error": 0.1},
     "'y' ranks the original's detections at mAP50 0.30"),
    ({"detections": {"map50": 0.9, "map50_reverse": 0.8}, "relative_error": 0.9}, None),
    ({"detections": {"map50": None, "map50_reverse": None}, "relative_error": 0.9}, None),  # nothing detected
    # the original's detections still ranked first, but none confident any more: the reverse is 0
    ({"detections": {"map50": 1.0, "map50_reverse": None}, "relative_error": 0.1},
     "'y' ranks the original's detections at mAP50 0.00"),
    ({"map_iou": 0.4, "relative_error": 0.3}, "'y' marks regions at IoU 0.40 with the original's"),
    ({"map_iou": 0.7, "relative_error": 0.6}, None),  # a map is judged by its regions
    ({"map_iou": None, "relative_error": 0.9}, None),  # the original marks nothing
    ({"relative_error": 0.8}, "'y' is 0.80 off the original's (relative error)"),
    ({"relative_error": 0.2}, None),
])
def test_poor_fidelity_is_named_by_what_the_output_means(output, warned):
    assert poor_fidelity({"outputs": {"y": output}}) == warned


def test_the_summary_warns_when_the_held_out_images_show_a_broken_model():
    result = {"agreement": 0.4, "outputs": {"logits": {"agreement": 0.4, "relative_error": 0.7}}}
    held_out = HeldOutFidelity(result, 16, False).to_dict()
    report = {"latency": {"original_ms": 2.0, "optimized_ms": 1.5, "cut": 0.25, "target": 0.2}, "blocks": [],
              "dropped": [], "seconds_per_stage": {}, "held_out": held_out}
    (line,) = [line for line in format_summary(report).splitlines() if line.startswith("warning:")]
    assert "'logits' agrees with the original's top class on 40%" in line and "--quantize auto" in line
    faster = {"candidates": [{"timing": {"cut": 0.5}, "error": None}]}
    report["quantization"] = {"mode": "auto", "used": False, "reason": "not quantised: no candidate stays within",
                              "plan": faster}
    summary = format_summary(report)
    assert "not quantised: no candidate stays within" in summary  # why auto left it off
    assert "--quantize int8, which auto left off" in summary and "--quantize auto" not in summary
    report["quantization"] = {"mode": "auto", "used": False, "reason": "int8 left off: a CUDA target", "plan": None}
    assert "--quantize" not in format_summary(report)  # int8 cannot run there: nothing to suggest
    report["quantization"] = {"mode": "auto", "used": True}
    assert "--quantize" not in format_summary(report)
    healthy = HeldOutFidelity({"outputs": {"logits": {"agreement": 0.95}}}, 16, False).to_dict()
    assert healthy["warning"] is None and "warning" not in format_summary({**report, "held_out": healthy})


def test_a_model_the_blocks_lever_broke_is_told_of_lever_auto_where_it_runs_smaller(r20):
    """Blocks as asked, a warning on the held-out images, a network that runs at a lower resolution:
    the warning names --lever auto (nudenet's YOLOv8n at 10%: blocks kept 17 of 296 detections on 800
    photos, the resolution lever 228)."""
    from graphprune.optimize import optimize
    from graphprune.passes.base import PassResult, Transform

    class ZeroClassifier(Transform):  # stands in for a recovery that left the model broken
        name = "zero_classifier"

        def run(self, model, ctx, inputs):
            broken = model.clone()
            for name, p in broken.graph_module.named_parameters():
                if name.endswith("fc.weight") or name.endswith("linear.weight"):
                    p.data.zero_()
            return PassResult(broken, record={})

    model, tiny = r20
    report = optimize(model, tiny, OptimizeConfig(show_progress=False), [ZeroClassifier(), CheckFidelity()]).report
    assert report["held_out"]["warning"] and report["lever"]["resolution_applies"] is True
    (line,) = [line for line in format_summary(report).splitlines() if line.startswith("warning:")]
    assert "--lever auto" in line
    report["lever"]["resolution_applies"] = False  # its outputs follow its size, say: nothing to suggest
    assert "--lever" not in format_summary(report)
