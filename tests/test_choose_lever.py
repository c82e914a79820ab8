"""lever "auto": both levers run on one context; the written model closer to the original on the
held-out images is kept (graphprune/choose_lever.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.backends.base import LatencySettings
from graphprune.choose_lever import LeverRun, choose
from graphprune.data import TinySet
from graphprune.errors import GraphpruneError
from graphprune.passes import HeldOutFidelity, PassState
from graphprune.passes.recover import RecoverySettings
from graphprune.passes.recoverability import RecoverabilitySettings
from graphprune.passes.refine_selection import RefineSettings


def _run(lever: str, kl: float | None = None, error: str | None = None, trained_on: bool = False,
         relative_error: float = 0.3, agreement: float | None = 0.9) -> LeverRun:
    if error is not None:
        return LeverRun(lever, None, error, 1.0)
    state = PassState(model=None)
    outputs = {"logits": {"layout": "classes", "agreement": agreement, "kl": kl, "relative_error": relative_error}}
    state.artifacts.put(HeldOutFidelity({"images": 40, "outputs": outputs}, 40, trained_on))
    return LeverRun(lever, state, None, 1.0)


def test_top_class_agreement_decides_where_it_differs_by_two_images_or_more():
    """Agreement decides, whichever lever has the lower held-out KL."""
    kept, reason = choose(_run("resolution", 0.58, agreement=34 / 40), _run("blocks", 0.38, agreement=32 / 40))
    assert kept.lever == "resolution"
    assert reason == "resolution: the original's top class on 34 of 40 held-out images with resolution, 32 with blocks"
    kept, _ = choose(_run("resolution", 0.1, agreement=30 / 40), _run("blocks", 0.4, agreement=36 / 40))
    assert kept.lever == "blocks"
    assert _run("blocks", 0.1).to_dict()["distance"] == {"agreement": 0.9, "output KL": 0.1, "relative error": 0.3}


def test_within_one_image_the_untrained_lever_is_kept():
    """Lite0 at 30%: both kept the top class on 31 of 40; blocks' lower KL (0.38 against 0.58) went
    with 4 points less top-1 on 800 other photos."""
    kept, reason = choose(_run("resolution", 0.58, agreement=31 / 40), _run("blocks", 0.38, agreement=32 / 40))
    assert kept.lever == "resolution"
    assert reason == ("resolution: the original's top class on 31 of 40 held-out images with resolution, 32 with "
                      "blocks (within 1: the untrained lever is kept)")


def test_outputs_without_classes_are_compared_by_the_relative_error():
    kept, reason = choose(_run("resolution", None, relative_error=0.2, agreement=None),
                          _run("blocks", None, relative_error=0.5, agreement=None))
    assert kept.lever == "resolution" and reason == "resolution: held-out relative error 0.2 with resolution, 0.5 with blocks"
    kept, reason = choose(_run("resolution", None, relative_error=0.4, agreement=None),
                          _run("blocks", None, trained_on=True, relative_error=0.1, agreement=None))
    assert kept.lever == "blocks" and reason.endswith("(blocks' recovery trained on these images)")


def test_a_lever_that_failed_leaves_the_other_and_both_failing_is_one_line():
    kept, reason = choose(_run("resolution", error="the outputs' shapes change"), _run("blocks", 0.5))
    assert kept.lever == "blocks" and reason == "blocks alone: resolution failed (the outputs' shapes change)"
    kept, _ = choose(_run("resolution", 0.5), _run("blocks", error="a 90% latency cut is not reachable"))
    assert kept.lever == "resolution"
    with pytest.raises(GraphpruneError) as exc:
        choose(_run("resolution", error="not at half the side"), _run("blocks", error="not reachable"))
    assert str(exc.value) == "neither lever reaches the target: blocks: not reachable; resolution: not at half the side"
    kept, reason = choose(_run("resolution", 0.0), None)
    assert kept.lever == "resolution" and "int8 alone" in reason


def test_auto_runs_both_levers_and_writes_the_closer_one(cli, tmp_path):
    """ResNet-20 at 32 px (its CIFAR weights), 15%: both levers reach it; the report holds both
    candidates' held-out distances and cut, and the summary says which was kept and why."""
    data, out, report = tmp_path / "tiny.npz", tmp_path / "fast.onnx", tmp_path / "r.json"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    code, stdout, err = cli("optimize", "zoo:cifar10_resnet20", "--latency-cut", "0.15", "--quantize", "none",
                            "--data", data, "-o", out, "--report", report, "--lever", "auto", "--min-time", "0.05",
                            "--estimator", "lstsq", "--recovery-iterations", "2", "--refine-evaluations", "0",
                            "--no-cache", "--quiet")
    assert code == 0, err
    lever = json.loads(report.read_text())["lever"]
    candidates = lever["candidates"]
    assert set(candidates) == {"resolution", "blocks"}
    for run in candidates.values():
        assert run["error"] is None, run["error"]
        assert set(run["distance"]) == {"agreement", "output KL", "relative error"} and run["cut"] is not None
    agree = {name: round(16 * c["distance"]["agreement"]) for name, c in candidates.items()}
    closer = max(agree, key=agree.get) if abs(agree["resolution"] - agree["blocks"]) >= 2 else "resolution"
    assert lever["chosen"] == closer and f"lever: {closer}: the original's top class on" in stdout
    written = gp.load(str(out))
    resized = any(node.op_type == "Resize" for node in written.onnx.proto.graph.node)
    assert resized == (closer == "resolution")


def test_auto_on_a_model_that_cannot_run_smaller_keeps_blocks_and_says_why(tmp_path):
    """A map's outputs follow the input's size: resolution fails in one line, blocks are kept."""
    from conftest import export_onnx

    class ResidualMap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                                                  torch.nn.Conv2d(8, 8, 3, padding=1)) for _ in range(3))
            self.head = torch.nn.Conv2d(8, 1, 1)

        def forward(self, x):
            x = self.stem(x).relu()
            for block in self.blocks:
                x = (x + block(x)).relu()
            return self.head(x).sigmoid()

    torch.manual_seed(0)
    model = gp.load(export_onnx(ResidualMap().eval(), (1, 3, 64, 64), tmp_path / "map.onnx"))
    tiny = TinySet(torch.rand(24, 3, 64, 64), torch.full((24,), -1))
    config = gp.OptimizeConfig(latency_cut=0.1, quantize="none", lever="auto", latency=LatencySettings(min_time_s=0.05),
                               recoverability=RecoverabilitySettings(estimator="lstsq"),
                               refine=RefineSettings(max_evaluations=0),
                               recovery=RecoverySettings(iterations=2, batch_size=8), show_progress=False)
    result = gp.optimize(model, tiny, config)
    lever = result.report["lever"]
    assert lever["chosen"] == "blocks" and "the outputs' shapes change" in lever["candidates"]["resolution"]["error"]
    assert lever["reason"].startswith("blocks alone: resolution failed") and result.report["dropped"]


def test_auto_refuses_a_pipeline_of_its_own():
    model = gp.load("zoo:cifar10_resnet20")
    tiny = TinySet(torch.randn(20, 3, 32, 32), torch.full((20,), -1))
    config = gp.OptimizeConfig(lever="auto", quantize="none", show_progress=False)
    with pytest.raises(GraphpruneError, match="lever 'auto' chooses between the two default pipelines"):
        gp.optimize(model, tiny, config, pipeline=[])
    with pytest.raises(GraphpruneError, match="lever 'auto' runs the default pipelines of both levers"):
        gp.default_pipeline(config)
