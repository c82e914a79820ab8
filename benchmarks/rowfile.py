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
