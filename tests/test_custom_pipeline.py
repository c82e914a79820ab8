"""optimize runs a pipeline a user edited: the README's example, a pass inserted after find_blocks."""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.backends.base import LatencySettings
from graphprune.data import TinySet
from graphprune.passes import Analysis, Blocks, PassResult
from graphprune.passes.recover import RecoverySettings
from graphprune.passes.recoverability import RecoverabilitySettings


class KeepFirstStage(Analysis):
    """Never drop the first stage's blocks: the candidates lose them."""

    name = "keep_first_stage"
    requires = provides = (Blocks,)  # an update of the block list

    def run(self, model, ctx, inputs):
        kept = Blocks(b for b in inputs[Blocks] if not b.name.startswith("layer1."))
        return PassResult(model, record={"kept": len(kept)}, artifacts=[kept])


def test_a_pass_inserted_into_the_default_pipeline_shapes_the_result():
    model = gp.load("zoo:cifar10_resnet20")
    tiny = TinySet(torch.randn(40, 3, 32, 32), torch.arange(40) % 10)
    config = gp.OptimizeConfig(latency_cut=0.15, quantize="none", latency=LatencySettings(min_time_s=0.05),
                               recoverability=RecoverabilitySettings(estimator="lstsq"),
                               recovery=RecoverySettings(iterations=2, batch_size=8), show_progress=False)
    steps = gp.default_pipeline(config)
    steps.insert(1, KeepFirstStage())
    result = gp.optimize(model, tiny, config, pipeline=steps)
    assert list(result.state.records)[:4] == ["find_blocks", "keep_first_stage", "add_layers", "profile_blocks"]
    assert result.state.records["keep_first_stage"]["kept"] == 6
    assert result.report["dropped"] and not any(n.startswith("layer1.") for n in result.report["dropped"])
    assert [b["name"] for b in result.report["blocks"]] == [b.name for b in gp.find_blocks(model)][3:]
    assert result.report["latency"]["selection_cut"] >= 0.15 and result.report["pipeline"][1] == "keep_first_stage"


def test_optimize_passes_names_the_steps(cli, tmp_path):
    """--passes runs the named steps (here the default list without refinement); an unknown name is
    one line naming the available passes, before the model is even read."""
    import json

    import numpy as np

    data, out, report = tmp_path / "tiny.npz", tmp_path / "fast.onnx", tmp_path / "r.json"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    common = ["optimize", "zoo:cifar10_resnet20", "--latency-cut", "0.15", "--quantize", "none", "--data", data,
              "-o", out,
              "--min-time", "0.05", "--estimator", "lstsq", "--recovery-iterations", "2", "--no-cache", "--quiet"]
    code, _, err = cli(*common, "--passes", "find_blocks,bogus")
    assert code == 1 and err.strip().count("\n") == 0 and "unknown pass 'bogus'" in err and "refine_selection" in err
    assert not out.exists()
    steps = [p.name for p in gp.default_pipeline(gp.OptimizeConfig(quantize="none")) if p.name != "refine_selection"]
    code, _, err = cli(*common, "--passes", ",".join(steps), "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["pipeline"] == steps and out.exists()
    assert json.loads(report.read_text())["changed_by"] == ["drop_blocks", "recover"]
    code, stdout, err = cli(*common, "--passes", "find_blocks", "-o", tmp_path / "same.onnx",  # nothing measured
                            "--plot", tmp_path / "p.png")
    assert code == 0, err
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "latency of the result not measured (the pipeline has no measure_result step)" in stdout
    assert "no step changed the model (steps run: find_blocks): the output is the input as it was" in stdout
