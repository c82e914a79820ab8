"""A benchmark's results file: a JSON list of rows, each with an ``id`` and the ``cpu`` it ran on.
A row replaces only the row of the same id from the same CPU; the file is rewritten atomically
after every row, so an interrupted run keeps what it finished and a rerun skips it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.common import results_dir


class RowFile:
    def __init__(self, name: str):
        self.name = name

    @property
    def path(self) -> Path:
        return results_dir() / f"{self.name}.json"

    def load(self) -> list[dict]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def save(self, row: dict) -> None:
        rows = [r for r in self.load() if not (r["id"] == row["id"] and r["cpu"] == row["cpu"])] + [row]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, self.path)

    def done(self, cpu: str) -> set[str]:
        return {r["id"] for r in self.load() if r["cpu"] == cpu}


def report_fields(report: dict, wall_s: float) -> dict:
    """What every row keeps of an ``optimize`` report: the written file's measured cut (and its split
    between block dropping and int8), the selection's, the blocks dropped, the int8 plan's choice,
    seconds per stage, the wall time and the machine's load."""
    import time

    latency, quant = report["latency"], report.get("quantization") or {}
    return {
        "cut_measured": latency["cut"], "cut_split": quant.get("cut"),
        "original_ms": latency["original_ms"], "optimized_ms": latency["optimized_ms"],
        "selection_cut": latency.get("selection_cut"),
        "dropped": report["dropped"], "quantized": bool(quant.get("used")),
        "plan": (quant.get("plan") or {}).get("chosen"), "plan_reason": quant.get("reason"),
        "float_nodes": quant.get("float_nodes"),
        "scoring_steps": report.get("scoring_steps"),  # where a time budget made them fewer than asked
        "seconds_per_stage": {k: round(v, 1) for k, v in report["seconds_per_stage"].items()},
        "wall_s": round(wall_s, 1), "load_average": os.getloadavg(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_rows(rows: RowFile, todo: list[dict], row_id, run_one, summary, cpu: str) -> None:
    """Run each row of ``todo`` (``run_one(row) -> dict``), save it as it finishes and print
    ``summary(done)``. A target graphprune refuses (one line: unreachable cut, ...) is a result too:
    recorded with its ``error``, not retried."""
    import time

    from graphprune.errors import GraphpruneError, first_line

    for row in todo:
        print(f"[{row_id(row)}] start {time.strftime('%H:%M:%S')}", flush=True)
        try:
            done = run_one(row)
        except GraphpruneError as exc:
            done = {"id": row_id(row), **row, "cpu": cpu, "error": first_line(exc),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rows.save(done)
        print(f"[{row_id(row)}] {summary(done)}", flush=True)
