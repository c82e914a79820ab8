"""Latency backends, per-block profiling and ``graphprune profile``.

No test asserts how fast anything is (that would flake on a loaded machine): the statistics and the
timing loops are checked with fake clocks and fake runs, the real backends on tiny models for
well-formed, finite results and for clear errors.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import graphprune as gp
from graphprune.backends.base import LatencySettings, LatencyStats, compare_interleaved, get_backend, time_runs
from graphprune.backends.onnxruntime import OnnxRuntimeBackend
from graphprune.backends.torch_eager import TorchEagerBackend
from graphprune.passes import (Artifacts, BlockLatencyTable, Blocks, MeasureBlockLatency, PassContext, PassState,
                               Pipeline, available_passes, measure_block_latency, measure_cut)
from onnx_builders import residual_onnx, save

FAST = LatencySettings(warmup_runs=1, warmup_s=0.0, min_runs=3, min_time_s=0.0)
FAST_CLI = ("--min-time", "0.001", "--min-runs", "3", "--no-progress")


class FakeClock:
    """A clock that only moves when a fake run says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_run(clock: FakeClock, seconds: float, log: list | None = None, label: str = ""):
    def run():
        clock.now += seconds
        if log is not None:
            log.append(label)
    return run


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return save(residual_onnx(), tmp_path_factory.mktemp("lat") / "tiny.onnx")


@pytest.fixture(scope="module")
def resnet20():
    return gp.load("zoo:cifar10_resnet20")


# ---- statistics and timing loops ------------------------------------------------------------

def test_stats_from_known_samples():
    stats = LatencyStats.from_samples([float(v) for v in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11)])
    assert stats.median_ms == 6 and stats.mean_ms == 6 and stats.runs == 11
    assert stats.p10_ms == pytest.approx(2.0) and stats.p90_ms == pytest.approx(10.0)
    assert stats.std_ms == pytest.approx(math.sqrt(10))
    assert set(stats.to_dict()) == {"median", "p10", "p90", "mean", "std", "runs"}
    single = LatencyStats.from_samples([4.0])
    assert single.p10_ms == single.median_ms == single.p90_ms == 4.0 and single.std_ms == 0.0
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_time_runs_stops_at_min_runs_when_time_is_reached():
    clock = FakeClock()
    settings = LatencySettings(warmup_runs=2, warmup_s=0.0, min_runs=50, min_time_s=0.01)
    stats = time_runs(fake_run(clock, 0.002), settings, clock=clock)
    assert stats.runs == 50 and stats.median_ms == pytest.approx(2.0)
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms


def test_time_runs_keeps_going_until_min_time():
    clock = FakeClock()
    calls = []
    settings = LatencySettings(warmup_runs=3, warmup_s=0.05, min_runs=5, min_time_s=1.0)
    stats = time_runs(fake_run(clock, 0.01, calls), settings, clock=clock)
    assert stats.runs == 100  # 1.0 s of 10 ms runs, well past min_runs
    assert len(calls) == 5 + 100  # warm-up by time (50 ms) outlasts warm-up by count (3 runs)


def test_interleaving_alternates_and_warms_each_model_first():
    clock, order = FakeClock(), []
    runs = [fake_run(clock, 0.001, order, "A"), fake_run(clock, 0.003, order, "B")]
    settings = LatencySettings(warmup_runs=2, warmup_s=0.0, min_runs=4, min_time_s=0.0)
    rounds = []
    a, b = compare_interleaved(runs, settings, clock=clock, on_round=rounds.append)
    assert order[:4] == ["A", "A", "B", "B"]
    assert order[4:] == ["A", "B"] * a.runs
    assert a.runs == b.runs == 4 and rounds == [1, 2, 3, 4]
    assert a.median_ms == pytest.approx(1.0) and b.median_ms == pytest.approx(3.0)


def test_interleaving_budget_is_min_time_per_model():
    clock = FakeClock()
    runs = [fake_run(clock, 0.01), fake_run(clock, 0.01)]
    settings = LatencySettings(warmup_runs=0, warmup_s=0.0, min_runs=1, min_time_s=0.5)
    a, b = compare_interleaved(runs, settings, clock=clock)
    assert a.runs == b.runs == 50  # 2 x 0.5 s of rounds of 20 ms


# ---- the real backends ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", [OnnxRuntimeBackend(), TorchEagerBackend()], ids=["onnxruntime", "torch"])
def test_backend_times_a_tiny_model(backend, tiny_onnx):
    model = gp.load(tiny_onnx)
    settings = LatencySettings(batch_size=3, threads=1, warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0)
    stats = time_runs(backend.prepare(model, settings), settings)
    assert stats.runs >= 5 and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    info = backend.describe(settings)
    assert info["backend"] == backend.name and info["batch_size"] == 3 and info["threads"] == 1
    assert info["device"] == "cpu" and "torch" in info["versions"] and info["cpu"]
    assert get_backend(backend.name).name == backend.name


def test_cpu_signature_reads_the_first_processor(tmp_path, monkeypatch):
    import builtins

    from graphprune.backends.environment import cpu_signature

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert cpu_signature() == "AuthenticAMD family 26 model 2 stepping 1"
    info.write_text("")
    assert cpu_signature() == ""


def test_torch_backend_leaves_the_callers_model_and_threads_alone(resnet20):
    model = resnet20.clone()
    model.graph_module.train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = TorchEagerBackend().prepare(model, LatencySettings(threads=1))
        run()
        assert torch.get_num_threads() == 2  # set to 1 for the run only
    finally:
        torch.set_num_threads(before)
    assert model.graph_module.training


def test_onnxruntime_one_thread_uses_one_core(tiny_onnx):
    """With intra_op_num_threads=1 no worker spins: CPU time cannot exceed wall time by much."""
    run = OnnxRuntimeBackend().prepare(gp.load(tiny_onnx), LatencySettings(batch_size=64, threads=1))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(200):
        run()
    assert (time.process_time() - cpu0) <= 1.3 * (time.perf_counter() - wall0) + 0.02


def test_cuda_unavailable_onnxruntime(tiny_onnx, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(gp.GraphpruneError, match="CUDAExecutionProvider.*available: CPUExecutionProvider"):
        OnnxRuntimeBackend().prepare(gp.load(tiny_onnx), LatencySettings(device="cuda"))


def test_cuda_unavailable_torch(tiny_onnx, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gp.GraphpruneError, match="'cuda' is not available.*--device cpu"):
        TorchEagerBackend().prepare(gp.load(tiny_onnx), LatencySettings(device="cuda"))


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch size"), ("threads", 0, "threads"), ("device", "tpu", "unknown device")])
@pytest.mark.parametrize("backend", [OnnxRuntimeBackend(), TorchEagerBackend()], ids=["onnxruntime", "torch"])
def test_bad_settings_are_refused(backend, field, value, message, tiny_onnx):
    settings = LatencySettings(**{field: value})
    with pytest.raises(gp.GraphpruneError, match=message):
        backend.prepare(gp.load(tiny_onnx), settings)


def test_fixed_batch_graph_refuses_another_batch(tmp_path):
    proto = residual_onnx()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = gp.load(save(proto, tmp_path / "fixed.onnx"))
    with pytest.raises(gp.GraphpruneError, match="fixed batch size of 1"):
        OnnxRuntimeBackend().prepare(model, LatencySettings(batch_size=4))


def test_unknown_backend():
    with pytest.raises(gp.GraphpruneError, match="unknown backend 'tvm'"):
        get_backend("tvm")


# ---- per-block profiling ----------------------------------------------------------------------

class CountingBackend:
    """Runs nothing; counts what it was asked to prepare."""

    name = "fake"

    def __init__(self):
        self.prepared: list[int] = []

    def prepare(self, model, settings):
        self.prepared.append(len(model.graph_module.graph.nodes))
        return lambda: None

    def describe(self, settings):
        return {"backend": self.name}


def test_per_block_covers_every_block_and_reuses_the_original(resnet20):
    backend = CountingBackend()
    state = PassState(resnet20, Artifacts([Blocks(gp.find_blocks(resnet20))]))  # as FindBlocks leaves it
    state = Pipeline([MeasureBlockLatency()]).run(resnet20, PassContext(resnet20, backend=backend, latency=FAST), state)
    table = state.artifacts[BlockLatencyTable]
    names = [b.name for b in state.artifacts[Blocks]]
    assert [row.name for row in table.rows] == names and len(names) == 9
    assert len(backend.prepared) == 1 + len(names)  # the original once, then one candidate per block
    assert all(n < backend.prepared[0] for n in backend.prepared[1:])  # candidates are smaller graphs
    assert table.original.runs == FAST.min_runs  # measured alone, once, with the reused original
    record = state.records["profile_blocks"]
    assert json.loads(json.dumps(record))["blocks"][0]["name"] == "layer1.0"
    assert record["settings"]["backend"] == "fake" and record["settings"]["min_runs"] == 3
    assert available_passes()["measure_block_latency"] is MeasureBlockLatency


def test_per_block_on_onnxruntime_gives_finite_numbers(tiny_onnx):
    table = measure_block_latency(OnnxRuntimeBackend(), gp.load(tiny_onnx), FAST, progress=False)
    (row,) = table.rows
    assert row.name == "block" and row.candidate_ms > 0 and row.original_ms > 0
    assert all(math.isfinite(v) for v in (row.saved_ms, row.saved_fraction))
    assert row.saved_fraction == pytest.approx(1 - row.candidate_ms / row.original_ms)
    assert table.original.p10_ms <= table.original.median_ms <= table.original.p90_ms
    assert table.to_dict()["settings"]["providers"] == ["CPUExecutionProvider"]


def test_no_blocks_still_measures_the_original(tiny_onnx):
    table = measure_block_latency(OnnxRuntimeBackend(), gp.load(tiny_onnx), FAST, blocks=[], progress=False)
    assert table.rows == [] and table.original.runs >= FAST.min_runs


def test_measure_cut_reuses_a_prepared_original(resnet20):
    backend = CountingBackend()
    candidate = gp.drop_blocks(resnet20, ["layer1.1", "layer3.2"])
    cut = measure_cut(backend, resnet20, candidate, FAST, original_run=lambda: None)
    assert len(backend.prepared) == 1 and cut.original.runs == cut.candidate.runs == FAST.min_runs
    measure_cut(backend, resnet20, candidate, FAST)
    assert len(backend.prepared) == 3  # without one, the original is prepared too


def test_measure_cut_on_onnxruntime(tiny_onnx):
    backend, model = OnnxRuntimeBackend(), gp.load(tiny_onnx)
    cut = measure_cut(backend, model, gp.drop_blocks(model, ["block"]), FAST)
    assert cut.original.runs == cut.candidate.runs >= FAST.min_runs
    assert math.isfinite(cut.cut) and cut.cut < 1
    assert cut.cut == pytest.approx(1 - cut.candidate.median_ms / cut.original.median_ms)
    assert cut.saved_ms == pytest.approx(cut.original.median_ms - cut.candidate.median_ms)
    assert set(cut.to_dict()) == {"original_ms", "candidate_ms", "cut", "saved_ms"}


# ---- the profile command ----------------------------------------------------------------------

def test_profile_json_whole_model(cli, tiny_onnx):
    code, out, err = cli("profile", tiny_onnx, "--json", "--batch-size", "2", *FAST_CLI)
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc["latency_ms"]) == {"median", "p10", "p90", "mean", "std", "runs"}
    assert doc["latency_ms"]["runs"] >= 3 and doc["blocks"] == []
    settings = doc["settings"]
    assert settings["backend"] == "onnxruntime" and settings["device"] == "cpu"
    assert settings["batch_size"] == 2 and settings["threads"] == 1
    assert {"onnxruntime", "onnx", "torch"} <= set(settings["versions"])


def test_profile_json_per_block(cli, tiny_onnx):
    code, out, err = cli("profile", tiny_onnx, "--json", "--per-block", "--backend", "torch", *FAST_CLI)
    assert code == 0, err
    doc = json.loads(out)
    assert [b["name"] for b in doc["blocks"]] == ["block"] and doc["settings"]["backend"] == "torch"
    assert set(doc["blocks"][0]) == {"name", "saved_ms", "saved_fraction"}
    assert all(math.isfinite(v) for v in (doc["blocks"][0]["saved_ms"], doc["blocks"][0]["saved_fraction"]))


def test_profile_table(cli, tiny_onnx):
    code, out, err = cli("profile", tiny_onnx, *FAST_CLI)
    first_line, rest = out.split("\n", 1)
    assert code == 0 and "1 thread, batch 1" in first_line and "latency: median" in rest and "block" not in rest
    code, out, err = cli("profile", tiny_onnx, "--per-block", *FAST_CLI)
    assert code == 0 and "saved %" in out and "\nblock " in out and "1 blocks" in out


def _one_line_error(result, expected, exit_code):
    code, out, err = result
    lines = [line for line in err.strip().splitlines() if line]
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("args, expected, exit_code", [
    (("--batch-size", "0"), "--batch-size: must be a positive integer", 2),
    (("--threads", "0"), "--threads: must be an integer from 1 to 256", 2),
    (("--min-time", "-1"), "--min-time: must be a positive number", 2),
    (("--backend", "tvm"), "unknown backend 'tvm'", 1),
    (("--device", "tpu"), "unknown device 'tpu'", 1),
])
def test_profile_bad_arguments(cli, tiny_onnx, args, expected, exit_code):
    # after FAST_CLI: an option given twice takes its last value (click checks only that one)
    _one_line_error(cli("profile", tiny_onnx, *FAST_CLI, *args), expected, exit_code)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_profile_cuda_unavailable(cli, tiny_onnx, backend, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(cli("profile", tiny_onnx, "--device", "cuda", "--backend", backend, *FAST_CLI), "cuda", 1)
