"""An undecoded YOLOX head (graphprune/grid_head.py): recognised from its anchor count and values,
decoded as YOLOX decodes it, and compared as detections by evaluate and int8's judge."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.data import TinySet
from graphprune.evaluate import evaluate
from graphprune.fidelity import output_layout
from graphprune.grid_head import GRID_REACH, GridHead, grid_head
from onnx_builders import save
from yolo_like import raw_yolox_onnx

SIZE = (64, 96)  # height, width: cells of strides 8, 16, 32 are 8x12, 4x6, 2x3
ANCHORS = 96 + 24 + 6


def _raw(batch=2, classes=2, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.randn(batch, ANCHORS, 4, generator=gen)
    return torch.cat([boxes, torch.rand(batch, ANCHORS, 1 + classes, generator=gen)], -1)


def test_the_grid_is_read_level_by_level_row_by_row_x_fastest():
    raw = _raw()
    head = grid_head(raw, SIZE)
    assert head == GridHead((8, 16, 32), SIZE) and head.anchors == ANCHORS
    decoded = head.read(raw)
    # level of stride 16 (after the 96 cells of stride 8), row 2, column 5: anchor 96 + 2 * 6 + 5
    anchor = 96 + 2 * 6 + 5
    dx, dy, lw, lh = raw[1, anchor, :4].tolist()
    expected = torch.tensor([(dx + 5) * 16, (dy + 2) * 16, torch.tensor(lw).exp() * 16, torch.tensor(lh).exp() * 16])
    assert torch.allclose(decoded[1, anchor, :4], expected, rtol=1e-5)
    assert torch.equal(decoded[..., 4:], raw[..., 4:])  # scores as they are
    assert output_layout(raw) == "other" and output_layout(raw, head) == "yolov5"


@pytest.mark.parametrize("change", ["anchors", "decoded_sizes", "scores", "far_offsets", "other_size"])
def test_what_is_not_an_undecoded_yolox_head_is_not_read_as_one(change):
    raw, size = _raw(), SIZE
    if change == "anchors":
        raw = raw[:, 1:]
    elif change == "decoded_sizes":  # widths and heights all >= 0: a decoded head (yolov5), not log sizes
        raw[..., 2:4] = raw[..., 2:4].abs()
    elif change == "scores":
        raw[..., 5] += 1.5
    elif change == "far_offsets":  # centres in pixels, not offsets within a few cells
        raw[..., 0] *= GRID_REACH * 10
    else:
        size = (96, 64)  # the same cell count: still read, the grid follows the size given
        assert grid_head(raw, size) == GridHead((8, 16, 32), size)
        return
    assert grid_head(raw, size) is None


def test_a_p6_head_of_four_levels_is_read():
    raw = torch.rand(1, 64 + 16 + 4 + 1, 7, generator=torch.Generator().manual_seed(0))  # 64 px: 8x8, 4x4, 2x2, 1x1
    raw[..., 2] = -0.5
    assert grid_head(raw, (64, 64)) == GridHead((8, 16, 32, 64), (64, 64))


def test_a_raw_head_is_evaluated_as_the_same_head_decoded_in_the_graph(tmp_path):
    """The same weights exported undecoded and with YOLOX's decoding in the graph, each compared with
    its own perturbed copy: the same detections kept and added, where relative error alone was read."""
    images = torch.rand(12, 3, *SIZE, generator=torch.Generator().manual_seed(3)) * 4 - 2
    data = TinySet(images, -torch.ones(len(images), dtype=torch.long))
    results = {}
    for decode in (False, True):
        original = gp.load(save(raw_yolox_onnx(decode=decode), tmp_path / f"{decode}.onnx"))
        changed = original.clone()
        with torch.no_grad():
            for p in changed.graph_module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        results[decode] = evaluate(changed, data, reference=original)
    raw, decoded = results[False]["outputs"]["output"], results[True]["outputs"]["output"]
    assert raw["layout"].startswith("an undecoded YOLOX head (offsets and log sizes on a grid of strides 8, 16, 32 "
                                    "at 64x96)")
    assert raw["layout"].endswith(decoded["layout"])
    assert raw["detections"] == decoded["detections"] and raw["detections"]["original"] > 20
    assert 0 < raw["detections"]["map50"] < 1  # the perturbation moved some detections


def test_int8_judges_a_raw_head_by_its_detections():
    """int8's plan judged such a head by its relative error (its bound 0.05 of the raw tensor), blind
    to the detections a user decodes from it."""
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import plan_quantization
    from test_quantize import fake_measure

    proto = raw_yolox_onnx()
    x = torch.rand(32, 3, *SIZE, generator=torch.Generator().manual_seed(0)) * 4 - 2
    plan = plan_quantization(proto, x[:16], x[16:], QuantizeSettings(max_calibration_images=16, batch_size=16),
                             fake_measure({"*": 0.3}))
    assert plan.metric == "map50_drop"
    assert all(c.detections is not None and c.detections["original"] > 0 for c in plan.candidates if not c.error)


def test_the_resolution_lever_refuses_a_raw_head_saying_what_it_is(tmp_path):
    """Its user builds the grid for the file's size: a smaller size inside the graph gives fewer
    anchors that no longer match it (it was refused only as 'the outputs' shapes change')."""
    from graphprune.errors import GraphpruneError
    from graphprune.passes.box_outputs import box_outputs
    from graphprune.passes.resize_input import check_resizable, resize_input, scale_for

    model = gp.load(save(raw_yolox_onnx(), tmp_path / "raw.onnx"))
    (box,) = box_outputs(model, torch.rand(2, 3, *SIZE) * 4 - 2)
    assert not box.mapped and "output 0 is an undecoded YOLOX head" in box.unmappable
    with pytest.raises(GraphpruneError, match="undecoded YOLOX head, which its user decodes on a grid of the file's"):
        check_resizable(model, resize_input(model, scale_for(64, 32), (box,)))


def test_the_cli_refuses_it_in_one_line_without_the_fixed_grid_advice(cli, tmp_path):
    from test_resolution import optimize_at_lower_resolution

    code, _, stderr, out = optimize_at_lower_resolution(cli, save(raw_yolox_onnx(size=(64, 64)), tmp_path / "r.onnx"),
                                                        tmp_path)
    lines = [line for line in stderr.splitlines() if line.startswith("graphprune: error:")]
    assert code == 1 and not out.exists() and len(lines) == 1 and "Traceback" not in stderr
    assert lines[0].endswith("(export it with its decoding: YOLOX's --decode_in_inference)")  # not ultralytics' dynamic=True


def test_inspect_says_why_the_resolution_lever_does_not_apply(cli, tmp_path):
    import json

    path = save(raw_yolox_onnx(size=(64, 64)), tmp_path / "r.onnx")
    code, stdout, _ = cli("inspect", path)
    assert code == 0 and ("resolution: no --lever resolution: the network cannot run at a lower resolution inside "
                          "the graph: output 0 is an undecoded YOLOX head") in stdout
    code, stdout, _ = cli("inspect", path, "--json")
    found = json.loads(stdout)
    assert found["runs_at_lower_resolution"] is False and "undecoded YOLOX head" in found["lower_resolution_refused"]
