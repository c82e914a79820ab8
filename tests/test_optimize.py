"""optimize end to end on small real-format inputs, and its bad-input corpus."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from onnx_builders import residual_onnx, save

# the float block pipeline (int8 has its own tests: test_plan_quantization.py, test_quantize.py)
FAST = ["--quantize", "none", "--min-time", "0.05", "--recovery-iterations", "8", "--recovery-batch-size", "16",
        "--estimator", "lstsq", "--no-cache", "--quiet"]


@pytest.fixture(scope="module")
def r20_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt")
    torch.manual_seed(0)
    path = folder / "r20.onnx"
    gp.save(gp.load("zoo:cifar10_resnet20"), path)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "tiny.npz", images=images, labels=np.arange(40) % 10)
    return path, folder / "tiny.npz"


def test_optimize_writes_a_verified_faster_model_and_a_report(cli, r20_onnx, tmp_path):
    model, data = r20_onnx
    out, report, plot = tmp_path / "fast.onnx", tmp_path / "r.json", tmp_path / "p.png"
    code, stdout, err = cli("optimize", model, "--latency-cut", "0.2", "--data", data, "-o", out,
                            "--report", report, "--plot", plot, "--eval-data", data, *FAST)
    assert code == 0, err
    doc = json.loads(report.read_text())
    # timings are checked by benchmarks, not here (another test may load the machine): the selection
    # stops only once its own measurement reaches the target, and the final cut is reported
    assert doc["latency"]["selection_cut"] >= 0.2 and isinstance(doc["latency"]["cut"], float)
    assert doc["dropped"] and set(doc["dropped"]) <= {b["name"] for b in doc["blocks"]}
    assert all(b["recoverability"] is not None and b["saved_fraction"] is not None for b in doc["blocks"])
    assert set(doc["seconds_per_stage"]) == {"find_blocks", "add_layers", "profile_blocks", "pool_identical_blocks", "check_reachable",
                                             "score_recoverability", "select_blocks", "refine_selection",
                                             "drop_blocks", "recover", "measure_result", "check_fidelity"}
    assert doc["refinement"]["skipped"] == "estimator lstsq"  # joint fits need the PRACTISE adaptors
    # ResNet-20's stages: the inner blocks of stages 2 and 3 are identical; stage 1's three too
    assert [g["blocks"] for g in doc["identical_blocks"]] == [["layer1.0", "layer1.1", "layer1.2"],
                                                             ["layer2.1", "layer2.2"], ["layer3.1", "layer3.2"]]
    pooled = {b["name"]: b["saved_fraction_pooled"] for b in doc["blocks"]}
    assert pooled["layer2.1"] == pooled["layer2.2"] and pooled["layer1.0"] == pooled["layer1.2"]
    assert "top1" in doc["eval"]["original"] and "agreement" in doc["eval"]["optimized"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == [i.name for i in onnx.load(str(model)).graph.input]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 32, 32), np.float32)})[0].shape == (3, 10)
    assert len(gp.find_blocks(gp.load(out))) == 9 - len(doc["dropped"])
    assert "measured cut" in stdout
    given = doc["latency"]["given_file"]  # the file as given, timed against its simplified form
    assert given["path"] == str(model) and given["ms"] > 0 and given["ratio"] == given["original_ms"] / given["ms"]
    assert given["cut"] == pytest.approx(1 - (1 - doc["latency"]["cut"]) * given["ratio"])


def test_optimize_can_recover_by_mimicking_the_feature_map(cli, r20_onnx, tmp_path):
    model, data = r20_onnx
    out, report = tmp_path / "fast.onnx", tmp_path / "r.json"
    code, _, err = cli("optimize", model, "--latency-cut", "0.2", "--data", data, "-o", out, "--report", report,
                       "--recovery-target", "feature-map", *FAST)
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["settings"]["recovery"]["target"] == "feature-map" and doc["recovery"]["final_loss"] > 0
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


class _HiddenHead(torch.nn.Module):
    """One residual block, then features that come through a Linear: there is no map to mimic."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.hidden, self.classifier = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.conv(x))
        return self.classifier(torch.relu(self.hidden(x.mean((2, 3)))))


def test_optimize_refuses_a_recovery_it_cannot_run_before_measuring_anything(monkeypatch):
    from graphprune.data import TinySet
    from graphprune.optimize import OptimizeConfig, optimize
    from graphprune.passes.recover import RecoverySettings

    from graphprune.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "prepare", lambda *a, **k: pytest.fail("measured before refusing"))
    model = gp.load(_HiddenHead(), input_shape=(1, 3, 8, 8))
    tiny = TinySet(torch.randn(12, 3, 8, 8), torch.full((12,), -1))
    for recovery, message in [(RecoverySettings(target="feature-map"), "feature-map"),
                              (RecoverySettings(loss="label"), "labelled"),
                              (RecoverySettings(augment="zoom"), "augmentation")]:
        with pytest.raises(gp.GraphpruneError, match=message):
            optimize(model, tiny, OptimizeConfig(latency_cut=0.2, recovery=recovery, show_progress=False))


@pytest.mark.slow  # joint refinement with the default 20 fits: about 2 minutes
def test_optimize_python_api_is_a_pipeline_of_passes(r20_onnx):
    from graphprune.backends.base import LatencySettings
    from graphprune.data import Preprocessing, load_tiny_set
    from graphprune.optimize import OptimizeConfig, optimize
    from graphprune.passes.recover import RecoverySettings
    from graphprune.passes.select_blocks import goal_cut

    model_path, data = r20_onnx
    model = gp.load(model_path)
    tiny = load_tiny_set(data, Preprocessing((3, 32, 32)))
    config = OptimizeConfig(latency_cut=0.15, quantize="none", latency=LatencySettings(min_time_s=0.05),
                            recovery=RecoverySettings(iterations=4, batch_size=8), show_progress=False)
    result = optimize(model, tiny, config)
    assert list(result.state.records) == ["find_blocks", "add_layers", "profile_blocks", "pool_identical_blocks", "check_reachable",
                                          "score_recoverability", "select_blocks", "refine_selection",
                                          "drop_blocks", "recover", "measure_result", "check_fidelity"]
    refinement = result.report["refinement"]
    evaluations = refinement["evaluations"]  # every set the search fitted, in order, the greedy set first
    assert evaluations and evaluations[0]["blocks"] == refinement["greedy"]
    assert len(evaluations) <= config.refine.max_evaluations
    best = evaluations[0]["joint_recoverability"]
    for e in evaluations[1:]:  # a move is taken exactly when it lowers J by more than min_gain
        gains = e["joint_recoverability"] < best * (1 - config.refine.min_gain)
        assert e.get("accepted", False) == gains
        best = e["joint_recoverability"] if gains else best
    accepted = [e for e in evaluations if e.get("accepted")]
    assert refinement["refined"] == (accepted[-1] if accepted else evaluations[0])["blocks"]
    assert best <= evaluations[0]["joint_recoverability"]  # the refined set fits no worse than the greedy one
    goal = goal_cut(config.latency_cut, config.margin)
    if set(refinement["refined"]) != set(refinement["greedy"]):  # re-measured and topped up to the goal
        assert result.report["dropped"] == refinement["dropped"] and refinement["measured_cut"] >= goal
    assert result.report["latency"]["selection_cut"] >= goal  # the final set reaches the measured goal
    assert len(gp.find_blocks(result.model)) == len(gp.find_blocks(model)) - len(result.report["dropped"])


def _clean_failure(result, expected, outputs):
    code, out, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    for path in outputs:
        assert not path.exists()


def _corrupt_folder(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not really")
    return folder


@pytest.mark.parametrize("case", ["cut_zero", "cut_one", "unreachable", "empty_folder", "corrupt_folder",
                                  "npz_shape", "no_blocks", "nan_weights", "missing_output_folder", "both_data"])
def test_optimize_bad_input(cli, r20_onnx, tmp_path, case):
    model, data = r20_onnx
    out = tmp_path / "out.onnx"
    argv = ["optimize", model, "--latency-cut", "0.2", "--data", data, "-o", out, *FAST]
    expected = {"cut_zero": "between 0 and 1", "cut_one": "between 0 and 1", "unreachable": "not reachable",
                "empty_folder": "no image files", "corrupt_folder": "no readable images", "npz_shape": "(N, H, W, C)",
                "no_blocks": "no residual blocks", "nan_weights": "NaN", "missing_output_folder": "does not exist",
                "both_data": "exactly one of"}[case]
    if case == "cut_zero":
        argv[3] = "0"
    elif case == "cut_one":
        argv[3] = "1.5"
    elif case == "unreachable":
        argv[1] = save(residual_onnx(), tmp_path / "one_block.onnx")
        argv[3] = "0.97"
        argv[5] = save_npz(tmp_path, (40, 8, 8, 4))
        argv += ["--mean", "0.5", "--std", "0.25"]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        argv[5] = tmp_path / "empty"
    elif case == "corrupt_folder":
        argv[5] = _corrupt_folder(tmp_path)
    elif case == "npz_shape":
        argv[5] = tmp_path / "bad.npz"
        np.savez(argv[5], images=np.zeros((40, 32), np.uint8))
    elif case == "no_blocks":
        argv[1] = "torchvision:squeezenet1_1"
        argv += ["--input-shape", "1,3,64,64"]
    elif case == "nan_weights":
        proto = onnx.load(str(model))
        init = proto.graph.initializer[0]
        values = onnx.numpy_helper.to_array(init).copy()
        values.flat[0] = np.nan
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        argv[1] = save(proto, tmp_path / "nan.onnx")
    elif case == "missing_output_folder":
        out = tmp_path / "nowhere" / "out.onnx"
        argv[7] = out
    elif case == "both_data":
        argv += ["--data-free"]
    _clean_failure(cli(*argv), expected, [out])


def save_npz(tmp_path, shape) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    return str(path)


def test_the_summary_names_a_given_file_slower_than_its_simplified_form():
    from graphprune.report import format_summary

    latency = {"original_ms": 0.4, "optimized_ms": 0.3, "cut": 0.25, "target": 0.2}
    report = {"latency": latency, "blocks": [], "dropped": [], "seconds_per_stage": {}}
    slow = {"ms": 0.8, "original_ms": 0.4, "ratio": 0.5, "cut": 0.625}
    assert "against the file as given the cut is 62.5%" in format_summary({**report, "latency": {
        **latency, "given_file": slow}})
    same = {"ms": 0.41, "original_ms": 0.4, "ratio": 0.4 / 0.41, "cut": 0.27}
    assert "as given" not in format_summary({**report, "latency": {**latency, "given_file": same}})


def test_the_summary_warns_where_the_written_models_cut_is_short_of_the_target():
    from graphprune.report import format_summary

    latency = {"original_ms": 10.0, "optimized_ms": 9.77, "cut": 0.023, "target": 0.1, "selection_cut": 0.177}
    report = {"latency": latency, "blocks": [], "dropped": [], "seconds_per_stage": {},
              "resumed_from_cache": {"latency_rows": 6, "recoverability": 0}}
    (line,) = [line for line in format_summary(report).splitlines() if line.startswith("warning:")]
    assert "2.3%, is short of the 10.0% target; selection measured 17.7%" in line
    assert "6 block timings from the cache" in line and "--cache-dir" in line and "raise --margin" in line
    fresh = format_summary({**report, "resumed_from_cache": {"latency_rows": 0}})
    assert "short of the 10.0% target" in fresh and "from the cache" not in fresh
    for cut in (0.09, 0.1, 0.3):  # within the interleaved noise of the target, or past it: no warning
        assert "warning" not in format_summary({**report, "latency": {**latency, "cut": cut}})


def test_the_summary_warns_where_the_steps_overran_the_time_budget():
    from graphprune.report import format_summary

    stages = {"profile_blocks": 119.0, "score_recoverability": 148.0, "recover": 100.0, "measure_result": 15.0}
    report = {"latency": None, "blocks": [], "dropped": [], "seconds_per_stage": stages,
              "settings": {"time_budget_s": 300.0}}
    (line,) = [line for line in format_summary(report).splitlines() if line.startswith("warning:")]
    assert "took 382 s, over the 300 s --time-budget" in line and "score_recoverability 148 s, profile_blocks 119 s" in line
    for settings in ({"time_budget_s": 382 / 1.05}, {"time_budget_s": None}, {}):  # within the slack; no budget
        assert "warning" not in format_summary({**report, "settings": settings})
