"""The architecture sweep's rows (benchmarks/arch_sweep.py): a written file, a refusal and an export
the exporter could not make are each one row of the table, and a row is kept where it resumed."""

from __future__ import annotations

import json

from benchmarks import arch_sweep
from benchmarks.rowfile import RowFile


def test_each_outcome_is_one_row_and_a_finished_row_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(arch_sweep, "ROWS", RowFile("arch_sweep"))
    cpu = arch_sweep.this_machine()
    written = {"id": "timm:a:64", "cpu": cpu, "exported": True, "rc": 0, "wall_s": 12.5,
               "kinds": {"identity": 3, "split": 1}, "unmeasured": 2, "dropped": 1, "cut": 0.123, "scoring_steps": 9}
    refused = {"id": "timm:b:64", "cpu": cpu, "exported": True, "rc": 1, "wall_s": 3.0,
               "error": "graphprune: error: a 10% latency cut is not reachable: ..."}
    unexported = {"id": "timm:c:64", "cpu": cpu, "exported": False, "error": "RuntimeError: Unknown model (c)"}
    runs = []

    def run_one(spec, folder):
        runs.append(spec)
        return {"timm:a:64": written, "timm:b:64": refused, "timm:c:64": unexported}[spec]

    monkeypatch.setattr(arch_sweep, "run_one", run_one)
    arch_sweep.main(["run", "--archs", "timm:a:64,timm:b:64,timm:c:64"])
    arch_sweep.main(["run", "--archs", "timm:a:64,timm:b:64,timm:c:64"])  # resumed: nothing left to run
    assert runs == ["timm:a:64", "timm:b:64", "timm:c:64"]
    assert [r["id"] for r in json.loads((tmp_path / "arch_sweep.json").read_text())] == runs
    table = (tmp_path / "arch_sweep.md").read_text().splitlines()
    assert "| timm:a:64 | " + cpu + " | yes | 12.5 | identity 3, split 1 | 2 | 1 | 12.3% | 9 |  |" in table
    assert any(line.startswith("| timm:b:64 |") and "| no |" in line and "not reachable" in line for line in table)
    assert any(line.startswith("| timm:c:64 |") and "Unknown model (c)" in line for line in table)
