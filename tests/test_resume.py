"""Interrupting optimize (Ctrl-C) leaves no output; running it again resumes from the cache and
makes the same choice.

The runs are made small (40 images, 40 adaptor steps a block, 3 joint fits of 20 steps, 4 recovery
steps) and the waits are guards against a hang, not time budgets: on a loaded 2-core machine the
product's default refinement (20 joint fits of 200 steps) made a run take over 10 minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import graphprune as gp

HANG = 900  # seconds after which a run counts as hung (idle, each takes well under a minute)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    gp.save(gp.load("zoo:cifar10_resnet20"), folder / "r20.onnx")
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "tiny.npz", images=images)
    return folder


def _argv(folder, out, report):
    return [sys.executable, "-m", "graphprune.cli", "optimize", str(folder / "r20.onnx"), "--latency-cut", "0.15",
            "--quantize", "none", "--data", str(folder / "tiny.npz"), "-o", str(out), "--report", str(report), "--cache-dir",
            str(folder / "cache"), "--min-time", "0.05", "--score-iterations", "40", "--refine-evaluations", "3",
            "--joint-iterations", "20", "--recovery-iterations", "4", "--recovery-batch-size", "8", "--quiet"]


def _recoverability_entries(cache) -> int:
    files = list(cache.glob("recoverability-*.json"))
    try:
        return len(json.loads(files[0].read_text())) if files else 0
    except ValueError:
        return 0


@pytest.mark.slow  # three optimize runs: minutes on a shared 2-core machine
def test_ctrl_c_then_resume(inputs, tmp_path):
    out, report = tmp_path / "fast.onnx", tmp_path / "report.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_argv(inputs, out, report), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + HANG
    while _recoverability_entries(inputs / "cache") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    assert _recoverability_entries(inputs / "cache") >= 2, f"two blocks were not scored within {HANG} s"
    proc.send_signal(signal.SIGINT)  # while scoring the third block or later
    stopped = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - stopped < 30  # stops promptly
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    scored = _recoverability_entries(inputs / "cache")
    assert 2 <= scored < 9

    again = subprocess.run(_argv(inputs, out, report), capture_output=True, text=True, env=env, timeout=HANG)
    assert again.returncode == 0, again.stderr
    doc = json.loads(report.read_text())
    assert doc["resumed_from_cache"]["recoverability"] >= scored
    assert doc["resumed_from_cache"]["latency_rows"] == 9

    out2, report2 = tmp_path / "fast2.onnx", tmp_path / "report2.json"
    third = subprocess.run(_argv(inputs, out2, report2), capture_output=True, text=True, env=env, timeout=HANG)
    assert third.returncode == 0, third.stderr
    doc2 = json.loads(report2.read_text())
    assert doc2["dropped"] == doc["dropped"]  # same command, same seed: same blocks
    strip = lambda d: [{k: v for k, v in b.items()} for b in d["blocks"]]
    assert strip(doc2) == strip(doc)


def test_a_cache_write_cut_by_ctrl_c_keeps_the_entries_before_it(tmp_path, monkeypatch):
    """What resuming relies on: a Ctrl-C during a cache write (here between writing the new file and
    renaming it over the old one) leaves the entries already there, and a rerun reads them."""
    from graphprune.cache import JsonCache

    cache = JsonCache(tmp_path, "recoverability", "key")
    cache["layer1.0"] = {"recoverability": 1.0}

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache["layer1.1"] = {"recoverability": 2.0}
    monkeypatch.undo()
    assert JsonCache(tmp_path, "recoverability", "key").data == {"layer1.0": {"recoverability": 1.0}}
