"""The resolution lever: resize_input (a resize at the graph's entry) and choose_resolution (the
largest internal size measured at the target)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.backends.base import CutMeasurement, LatencyStats
from graphprune.data import TinySet
from graphprune.errors import GraphpruneError
from graphprune.formats.io_onnx import load_proto
from graphprune.formats.model_io import to_onnx
from graphprune.formats.ort_run import cpu_session
from graphprune.optimize import OptimizeConfig, make_context, optimize
from graphprune.passes import ChooseResolution, ResizeInput, ResolutionChoice, resize_input
from graphprune.passes import choose_resolution as choose_module
from graphprune.passes.choose_resolution import candidate_sides
from graphprune.passes.resize_input import aligned_sides, axis_scales, check_resizable, runs_smaller, scale_for
from graphprune.report import _resolution_lines
from conftest import export_onnx
from onnx_builders import residual_onnx
from test_quantize import convnet


def _onnx_model(proto: onnx.ModelProto):
    return load_proto(proto)


def test_resize_input_puts_one_resize_before_everything_and_onnxruntime_agrees():
    """Structure: one interpolate node reads the input, every former reader reads it instead; the
    written file's first node is a linear half-pixel Resize and its input and outputs are the
    original's. Numbers: the original network on F.interpolate of the images, in fx and onnxruntime."""
    model = _onnx_model(convnet())
    resized = resize_input(model, scale_for(16, 12))
    graph = resized.graph_module.graph
    image = next(n for n in graph.nodes if n.op == "placeholder")
    assert [u.target for u in image.users] == [F.interpolate]
    assert len(list(model.graph_module.graph.nodes)) + 1 == len(list(graph.nodes))
    proto = to_onnx(resized)
    first = proto.graph.node[0]
    assert first.op_type == "Resize" and first.input[0] == "X"
    attrs = {a.name: a.s.decode() for a in first.attribute}
    assert attrs == {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    assert [i.name for i in proto.graph.input] == ["X"] and [o.name for o in proto.graph.output] == ["Y"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 16  # the file still takes 16 x 16
    x = torch.randn(3, 3, 16, 16)
    scale = scale_for(16, 12)
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    assert small.shape[-2:] == (12, 12)
    expected = model.graph_module.eval()(small).detach()
    got = resized.graph_module.eval()(x).detach()
    torch.testing.assert_close(got, expected)
    # the scale exceeds 12/16 by a thousandth of a pixel: the same map as a resize to 12 x 12, to 1e-3
    exact = model.graph_module.eval()(F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got, exact.detach(), atol=1e-3, rtol=0)
    session = cpu_session(proto)
    out = session.run(None, {"X": x.numpy()})[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-4)
    assert model.graph_module is not resized.graph_module and "resized_input" not in model.meta


def test_a_resize_by_one_scale_per_axis_is_written_and_run_alike():
    """A (height, width) scale: 13 x 12 in fx, one Resize with scales (1, 1, h, w), onnxruntime agrees."""
    model = _onnx_model(convnet())
    scale = (scale_for(16, 13), scale_for(16, 12))
    resized = resize_input(model, scale)
    proto = to_onnx(resized)
    scales = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == proto.graph.node[0].input[2])
    np.testing.assert_allclose(scales, [1.0, 1.0, *scale], rtol=1e-6)
    x = torch.randn(2, 3, 16, 16)
    exact = model.graph_module.eval()(F.interpolate(x, size=(13, 12), mode="bilinear", align_corners=False)).detach()
    got = resized.graph_module.eval()(x).detach()
    torch.testing.assert_close(got, exact, atol=1e-3, rtol=0)
    np.testing.assert_allclose(cpu_session(proto).run(None, {"X": x.numpy()})[0], got.numpy(), atol=1e-4)
    with pytest.raises(GraphpruneError, match=r"scale must be in \(0, 1\)"):
        resize_input(model, (1.0, 1.0))


def test_scale_for_gives_the_side_asked_for():
    for side in (16, 32, 224, 225, 320, 640, 1333):
        for target in range(max(1, side // 2), side):
            assert int(side * scale_for(side, target)) == target


def test_resize_refuses_in_one_line_what_it_cannot_write_or_run():
    with pytest.raises(GraphpruneError, match="opset 11 or later"):
        resize_input(_onnx_model(residual_onnx(opset=10)), 0.5)
    with pytest.raises(GraphpruneError, match=r"scale must be in \(0, 1\)"):
        resize_input(_onnx_model(convnet()), 1.0)
    # outputs that follow the input's size (a map, a detector's anchors): refused by their shapes
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Sigmoid()).eval()
    model = gp.load(torch.export.export(net, (torch.randn(1, 3, 16, 16),)))
    with pytest.raises(GraphpruneError) as exc:
        check_resizable(model, resize_input(model, scale_for(16, 12)))
    assert "outputs' shapes change ([(1, 4, 16, 16)] -> [(1, 4, 12, 12)])" in str(exc.value)
    assert "\n" not in str(exc.value)


def _fake_cuts(monkeypatch, seen):
    """Latency in proportion to the pixels: cut = 1 - height x width / 16^2 of the convnet's 16 px
    input; ``seen``: the sides of each size timed (a pair where they differ)."""
    def measure_cut(backend, original, candidate, settings, original_run=None):
        height, width = (int(16 * s) for s in axis_scales(candidate.meta["resized_input"]))
        seen.append(height if height == width else (height, width))
        stats = LatencyStats(1.0, 1.0, 1.0, 1.0, 0.0, 1)
        return CutMeasurement(stats, stats, 1.0 - height * width / 16 ** 2)
    monkeypatch.setattr(choose_module, "measure_cut", measure_cut)


def _context(model, cut):
    tiny = TinySet(torch.randn(20, 3, 16, 16), torch.full((20,), -1))
    return make_context(model, tiny, OptimizeConfig(latency_cut=cut, quantize="none", show_progress=False))


def test_choose_resolution_steps_down_then_bisects_to_the_largest_side_at_the_goal(monkeypatch):
    """Goal 0.3 + 0.005: 1 - (s/16)^2 >= 0.305 holds for s <= 13.3. Steps of 1 px at 16 px (from
    STEP at 224) find 13 at once; the choice is the largest side measured at the goal (14 x 13, one
    side of each, cuts 0.289: short of it)."""
    seen = []
    _fake_cuts(monkeypatch, seen)
    model = _onnx_model(convnet())
    result = ChooseResolution(0.005)(model, _context(model, 0.3))
    choice = result.value
    assert choice.size == (13, 13) and choice.scale == scale_for(16, 13) and seen == [15, 14, 13, (14, 13), (13, 14)]
    assert [m["size"] for m in choice.measurements] == [[15, 15], [14, 14], [14, 13], [13, 14], [13, 13]]
    assert "13x13: the largest size measured at the goal (34.0% >= 30.5%)" == choice.reason
    assert candidate_sides(224)[:3] == [216, 208, 200] and candidate_sides(16)[-1] == 8


def test_choose_resolution_bisects_between_coarse_steps(monkeypatch):
    seen = []
    _fake_cuts(monkeypatch, seen)
    monkeypatch.setattr(choose_module, "STEP", 8 * 224 / 16 * 4 / 8)  # 4 px steps at 16 px: 12, then 14, 13
    model = _onnx_model(convnet())
    choice = ChooseResolution(0.005)(model, _context(model, 0.3)).value
    assert seen == [12, 14, 13, (14, 13), (13, 14)] and choice.size == (13, 13)


def test_choose_resolution_takes_a_size_between_two_squares_one_pixel_apart(monkeypatch):
    """Goal 0.28 + 0.005: 14 x 14 cuts 0.234 (short), 13 x 13 0.340, 14 x 13 and 13 x 14 0.289 (at the
    goal, more pixels): the first of those (equal cuts) is chosen, its scale a (height, width) pair,
    and the resized model runs at that size."""
    seen = []
    _fake_cuts(monkeypatch, seen)
    model = _onnx_model(convnet())
    context = _context(model, 0.28)
    choice = ChooseResolution(0.005)(model, context).value
    assert choice.size == (14, 13) and choice.scale == (scale_for(16, 14), scale_for(16, 13))
    assert choice.to_dict()["scale"] == [scale_for(16, 14), scale_for(16, 13)] and "14x13" in choice.reason
    resized = ResizeInput()(model, context, choice).model
    assert resize_input(model, choice.scale).meta["resized_input"] == choice.scale
    assert resized.meta["resized_input"] == choice.scale


def test_choose_resolution_times_a_size_near_the_goal_again_and_judges_by_the_mean(monkeypatch):
    """Goal 0.28 + 0.005. 14 x 13 (0.289) first reads 0.281, within ``NEAR`` of the goal: timed again
    (0.293, 0.293), its mean 0.289 reaches the goal; 13 x 14 reads 0.269, clear of it: timed once."""
    seen = []
    _fake_cuts(monkeypatch, seen)
    timed = choose_module.measure_cut
    offsets = {(14, 13): [-0.008, 0.004, 0.004], (13, 14): [-0.02]}

    def measure_cut(backend, original, candidate, settings, original_run=None):
        cut = timed(backend, original, candidate, settings, original_run)
        key = seen[-1] if isinstance(seen[-1], tuple) else None
        return CutMeasurement(cut.original, cut.candidate, cut.cut + (offsets[key].pop(0) if key in offsets else 0))
    monkeypatch.setattr(choose_module, "measure_cut", measure_cut)
    model = _onnx_model(convnet())
    choice = ChooseResolution(0.005)(model, _context(model, 0.28)).value
    assert seen == [15, 14, 13, (14, 13), (14, 13), (14, 13), (13, 14)] and choice.size == (14, 13)
    assert choice.reason == "14x13: the largest size measured at the goal (28.9% >= 28.5%, the mean of 3 timings)"
    assert [len(m["timings"]) for m in choice.measurements] == [1, 1, 3, 1, 1]
    assert "14x13 28.9% (mean of 3), 13x14 26.9%, 13x13 34.0%" in _resolution_lines(choice.to_dict())[1]


def test_choose_resolution_stops_in_one_line_at_a_size_the_network_cannot_run_at(monkeypatch, tmp_path):
    """A stride-2 conv then a Linear on its flattened map: at 15 px the map is 8 x 8 as at 16, at
    14 px 7 x 7, which the Linear cannot take. 15 px (12.1%) is short of a 30% goal, so the run stops
    at 14 px with what broke and what the sizes that run reach, before timing the size it cannot run."""
    seen = []
    _fake_cuts(monkeypatch, seen)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 5)).eval()
    model = gp.load(export_onnx(net, (1, 3, 16, 16), tmp_path / "fixed.onnx"))
    with pytest.raises(GraphpruneError) as exc:
        ChooseResolution(0.005)(model, _context(model, 0.3))
    message = str(exc.value)
    assert message.startswith("a 30% latency cut is not reachable by resolution: the network cannot run at 14x14")
    assert message.endswith("its layers fix the input's size; the larger sizes it runs at measure at most 12.1%")
    assert seen == [15] and "\n" not in message


def test_the_resolution_lever_takes_a_margin_of_its_own_from_the_config():
    """Its goal is the target plus ``resolution_margin`` (1.5 points unless set), not blocks' ``margin``."""
    from graphprune.optimize import default_pipeline

    (step,) = [s for s in default_pipeline(OptimizeConfig(lever="resolution", quantize="none"))
               if isinstance(s, ChooseResolution)]
    assert step.margin == choose_module.MARGIN == 0.015
    (step,) = [s for s in default_pipeline(OptimizeConfig(lever="resolution", quantize="none", margin=0.0,
                                                          resolution_margin=0.02)) if isinstance(s, ChooseResolution)]
    assert step.margin == 0.02


def test_a_larger_size_above_the_target_but_inside_the_margin_is_named(monkeypatch):
    """Target 30%, margin 5 points: 13 px cuts 34.0%, above the target but short of the goal; the
    reason names it and the flag that takes it. A size clear of the margin gets no such note."""
    _fake_cuts(monkeypatch, [])
    model = _onnx_model(convnet())
    choice = ChooseResolution(0.05)(model, _context(model, 0.3)).value
    assert choice.size in ((13, 12), (12, 13))
    assert choice.reason.endswith("; 13x13 measured 34.0%, above the 30% target but inside the margin: a smaller "
                                  "--resolution-margin takes it, at the risk of a final timing short of the target")
    assert "inside the margin" not in ChooseResolution(0.005)(model, _context(model, 0.3)).value.reason


def test_choose_resolution_refuses_an_unreachable_target_in_one_line(monkeypatch):
    _fake_cuts(monkeypatch, [])
    model = _onnx_model(convnet())
    with pytest.raises(GraphpruneError) as exc:
        ChooseResolution(0.005)(model, _context(model, 0.9))
    assert str(exc.value) == "a 90% latency cut is not reachable by resolution: at 8x8 (50% of the side) it measures 75.0%"


def test_resize_input_without_a_scale_leaves_the_model():
    model = _onnx_model(convnet())
    result = ResizeInput()(model, None, ResolutionChoice(None, None, [], "quantisation alone reaches the target"))
    assert result.model is model and not result.changed


def _pooling_net_onnx(path):
    """A 64 px convnet that pools globally, exported as a user would (dynamic batch)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def test_optimize_with_the_resolution_lever_writes_a_file_onnxruntime_runs(tmp_path):
    """End to end on the real onnxruntime backend: a 64 px convnet, a 20% target."""
    path = _pooling_net_onnx(tmp_path / "net.onnx")
    model = gp.load(str(path))
    tiny = TinySet(torch.rand(24, 3, 64, 64), torch.full((24,), -1))
    result = optimize(model, tiny, OptimizeConfig(latency_cut=0.2, quantize="none", lever="resolution",
                                                  show_progress=False))
    report = result.report
    assert report["resolution"]["size"][0] < 64 and report["latency"]["cut"] > 0.1
    assert result.state.changed_by == ["resize_input"]
    out = tmp_path / "fast.onnx"
    gp.save(result.model, out, str(path))
    proto = onnx.load(str(out))
    assert proto.graph.node[0].op_type == "Resize"
    session = cpu_session(proto)
    x = tiny.images[:2].numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0],
                               result.model.graph_module.eval()(tiny.images[:2]).detach().numpy(), atol=1e-4)
    with pytest.raises(GraphpruneError, match="lever must be one of blocks, resolution"):
        OptimizeConfig(lever="pixels")


def optimize_at_lower_resolution(cli, path, tmp_path, cut=0.2):
    """``optimize --lever resolution`` at a ``cut`` target (20%) on 24 random 64 px images, float:
    (status, stdout, stderr, the output path)."""
    np.savez(tmp_path / "tiny.npz", images=np.random.default_rng(0).integers(0, 255, (24, 64, 64, 3), np.uint8))
    out = tmp_path / "fast.onnx"
    code, stdout, stderr = cli("optimize", path, "--data", tmp_path / "tiny.npz", "--latency-cut", str(cut),
                               "--lever", "resolution", "--quantize", "none", "-o", out)
    return code, stdout, stderr, out


def test_the_cli_runs_the_resolution_lever_and_says_what_it_chose(cli, tmp_path):
    path = _pooling_net_onnx(tmp_path / "net.onnx")
    code, stdout, stderr, out = optimize_at_lower_resolution(cli, path, tmp_path)
    assert code == 0, stderr
    assert "resolution: the network runs at " in stdout and "behind a resize at its entry" in stdout
    assert "block " not in stdout.split("\n")[0] and out.exists()
    code, _, stderr = cli("optimize", path, "--data", tmp_path / "tiny.npz", "--latency-cut", "0.2",
                          "--lever", "pixels", "-o", tmp_path / "other.onnx")
    assert code == 2 and "'pixels' is not one of 'blocks', 'resolution'" in stderr


def _map_net_onnx(path):
    """A 64 px net whose output is a (N, 1, H, W) map of the input's size (a text detector's shape)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1),
                              torch.nn.Sigmoid()).eval()
    return export_onnx(net, (1, 3, 64, 64), path)


def test_the_cli_refuses_the_resolution_lever_for_a_map_in_one_line(cli, tmp_path):
    path = _map_net_onnx(tmp_path / "map.onnx")
    code, _, stderr, out = optimize_at_lower_resolution(cli, path, tmp_path)
    lines = [line for line in stderr.splitlines() if line.startswith("graphprune: error:")]
    assert code == 1 and not out.exists() and len(lines) == 1 and "Traceback" not in stderr
    assert "the outputs' shapes change" in lines[0]


def test_inspect_says_whether_the_resolution_lever_applies(cli, tmp_path):
    import json

    from onnx_builders import save
    from yolo_like import pixel_detector_onnx

    classifier = _pooling_net_onnx(tmp_path / "net.onnx")
    code, stdout, _ = cli("inspect", classifier)
    assert code == 0 and "1 layers of a network without residual blocks" in stdout
    assert "resolution: the network runs at a lower resolution inside the graph" in stdout
    code, stdout, _ = cli("inspect", classifier, "--json")
    assert code == 0 and json.loads(stdout)["runs_at_lower_resolution"] is True
    code, stdout, _ = cli("inspect", _map_net_onnx(tmp_path / "map.onnx"))
    assert code == 0 and "resolution: no --lever resolution: at 48x48 inside the graph the outputs' shapes change" in stdout
    detector = save(pixel_detector_onnx(), tmp_path / "yolo.onnx")  # its boxes are mapped back
    code, stdout, _ = cli("inspect", detector)
    assert code == 0 and "resolution: the network runs at a lower" in stdout


def test_a_resized_file_keeps_no_shape_of_the_input_size_and_quantises(tmp_path):
    """The lowered file's recorded intermediate shapes were the 32 px input's: on ResNet-56 behind a
    resize (--quantize auto) QOperator int8 then wrote a QLinearAdd that onnxruntime refused. This
    small net's int8 form ran even so, so the check is structural: the resized file records no
    shape of the input's size, and its QOperator int8 form still runs."""
    from graphprune.passes.quantize import QuantConfig, quantize_onnx
    from test_plan_quantization import _TwoBlocks  # two residual Adds on maps of the input's size

    torch.manual_seed(0)
    model = gp.load(export_onnx(_TwoBlocks().eval(), (1, 3, 32, 32), tmp_path / "res.onnx"))
    assert len(model.onnx.proto.graph.value_info) > 0  # the exporter recorded them
    proto = to_onnx(resize_input(model, scale_for(32, 26)))
    recorded = [d.dim_value for v in proto.graph.value_info for d in v.type.tensor_type.shape.dim]
    assert 32 not in recorded and 26 in recorded  # shapes inferred again at the size it runs at
    images = torch.rand(16, 3, 32, 32)
    quantized = quantize_onnx(proto, images, QuantConfig(fmt="qoperator"))
    assert cpu_session(quantized).run(None, {"input": images[:2].numpy()})[0].shape == (2, 4)


class _StrideAligned(torch.nn.Module):
    """A Focus (odd and even pixels side by side: an even side) then three 2x poolings whose maps are
    upsampled and added back: it runs only where the side is a multiple of 8, as YOLOX runs only at
    multiples of 32."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(12, 4, 3, padding=1), torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))
        p2 = F.max_pool2d(x, 2)
        p4 = p2 + F.interpolate(F.max_pool2d(p2, 2), scale_factor=2.0)
        x = x + F.interpolate(p4, scale_factor=2.0)
        return self.fc(x.mean((2, 3)))


def test_aligned_sides_round_a_side_down_to_the_strides_multiples():
    assert aligned_sides(401) == [401, 400, 384]
    assert aligned_sides(123, 100) == [123, 122, 120, 112]
    assert aligned_sides(128) == [128]


def test_choose_resolution_tries_a_candidate_rounded_to_the_strides_it_runs_at(monkeypatch, tmp_path):
    """At 72 px the steps are 3 px (69, 66, ..., 48): the net runs at none of them but 48. 69 rounded
    down to a multiple of 8, 64, runs and is timed in its place: cut = 1 - (s/72)^2 with an 18% goal
    (+0.5) reaches it there (21.0%), where the steps alone would end at 48 px (55.6%). inspect's check
    finds 48 (3/4 of 72 is 54, rounded to 8); without the rounding it found no size."""
    timed = []

    def measure_cut(backend, original, candidate, settings, original_run=None):
        height, width = (int(72 * s) for s in axis_scales(candidate.meta["resized_input"]))
        timed.append(height)
        stats = LatencyStats(1.0, 1.0, 1.0, 1.0, 0.0, 1)
        return CutMeasurement(stats, stats, 1.0 - height * width / 72 ** 2)

    monkeypatch.setattr(choose_module, "measure_cut", measure_cut)
    model = gp.load(export_onnx(_StrideAligned().eval(), (1, 3, 72, 72), tmp_path / "aligned.onnx"))
    with pytest.raises(GraphpruneError, match="cannot run at 69x69"):
        check_resizable(model, resize_input(model, scale_for(72, 69)))
    tiny = TinySet(torch.rand(20, 3, 72, 72), torch.full((20,), -1))
    ctx = make_context(model, tiny, OptimizeConfig(latency_cut=0.18, quantize="none", show_progress=False))
    choice = ChooseResolution(0.005)(model, ctx).value
    assert choice.size == (64, 64) and timed == [64]  # between 72 and 64 it runs at no size to time
    assert runs_smaller(model)
