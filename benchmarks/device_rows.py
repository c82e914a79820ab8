"""Rows of ``benchmarks.compare_methods`` whose recoveries run on a lent GPU machine.

A row's recovery (2000 training steps) is most of its cost: about 10 minutes on a 2-core CPU, tens
of seconds on a GPU. Everything that touches latency stays on this machine, so every cut in the
results is measured on the same CPU whichever machine trained the weights:

1. ``plan`` (here): the row's tiny set and its selection (blocks or channels), chosen by measured
   latency exactly as ``python -m benchmarks.compare_methods run`` does; each row becomes a ``recover``
   job of ``benchmarks.jobs`` in ``.gpu/plan/jobs.json``, with the files it reads copied under
   ``.gpu/`` (git-ignored; it travels to the device machine). ``no-recovery`` rows need no
   training, and rows whose network a CPU of the same vendor already recovered take that top-1
   (``compare_rows.earlier_recovery``; ``--recover-again`` plans them anyway): both are finished
   here directly.
2. on the device machine: ``python -m benchmarks.jobs .gpu/plan/jobs.json $OUT/rows.jsonl --device
   cuda --workers 12``: recovery, then top-1 of the recovered model (float32, TF32 off) on
   test_lossless_1000 and test.npz.
3. ``ingest RESULTS.jsonl`` (here): each row's cut is re-measured independently on this machine
   (the pruned graph is the recovered one: recovery changes weights only), and the row is appended
   to ``benchmarks/results/<model>.json`` with ``recovery.device`` naming where it trained.

    python -m benchmarks.device_rows plan --grid main --only graphprune,block-influence [--limit N]
    python -m benchmarks.device_rows ingest rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import DATA, ROOT
from benchmarks.compare_methods import (Bench, add_row_arguments, append_row, finish_row, finished_ids, prepare_row,
                                        recovery_settings, reused_row, row_id, rows_to_do, run_row)
from benchmarks.compare_rows import earlier_recovery
from benchmarks.filter_l1 import filter_model_path

STAGE = ROOT / ".gpu"
PLAN = STAGE / "plan"
STAGED_DATA = {"train": "data/cifar10/train_lossless_4000.npz", "lossless1000": "data/cifar10/test_lossless_1000.npz",
               "jpeg10k": "data/cifar10/test.npz"}


def _stage(path: str | Path, name: str) -> str:
    """Copy ``path`` to ``.gpu/<name>`` (once) and return the path the device machine reads."""
    target = STAGE / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return str(target.relative_to(ROOT))


def staged_model(path: str | Path) -> str:
    return _stage(path, f"plan/{Path(path).name}")


def staged_train() -> str:
    return _stage(DATA["train"], STAGED_DATA["train"])


def staged_eval() -> dict[str, str]:
    """The two test sets every recover job is evaluated on, staged for the device machine."""
    return {"lossless1000": _stage(DATA["test_lossless"], STAGED_DATA["lossless1000"]),
            "jpeg10k": _stage(DATA["test_jpeg"], STAGED_DATA["jpeg10k"])}


def job_recovery(settings) -> dict:
    """RecoverySettings as a job's ``recovery``: device and seed are the job runner's to set."""
    return {k: v for k, v in asdict(settings).items() if k not in ("device", "seed")}


def plan_job(bench: Bench, row: dict, prepared: dict) -> dict:
    import torch

    removed = prepared["removed"]
    job = {"id": row_id(row), "kind": "recover", "seed": row["seed"], "row": row, "removed": removed,
           "recovery": job_recovery(recovery_settings(row)), "eval": staged_eval(),
           "model": staged_model(bench.paths[prepared["key"]])}
    if removed["tiny_set"].startswith("train_lossless_4000"):
        job.update(data=staged_train(), samples=row["samples"])
    else:  # synthetic or resized photos: saved exactly as made here
        path = PLAN / f"tiny_{job['id'].replace('/', '_')}.pt"
        torch.save({"images": prepared["tiny"].images, "labels": prepared["tiny"].labels}, path)
        job.update(data=str(path.relative_to(ROOT)), samples=None)
    if "channel_ratio" in removed:
        job["filter_model"] = staged_model(filter_model_path(row["model"], removed["channel_ratio"]))
    else:
        job["drop"] = removed["blocks"]
    job["prepare_s"] = time.perf_counter() - prepared["start"]
    return job


def cmd_plan(args) -> None:
    jobs_path = PLAN / "jobs.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.exists() else []
    todo = rows_to_do(args, {j["id"] for j in jobs})
    if not todo:
        return
    PLAN.mkdir(parents=True, exist_ok=True)
    bench = Bench()
    for row in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {row_id(row)} ...", flush=True)
        try:
            if row["method"] == "no-recovery":
                append_row(row["model"], run_row(bench, row))
                continue
            prepared = prepare_row(bench, row)
            earlier = earlier_recovery(row, prepared["removed"], asdict(recovery_settings(row)))
            if earlier is not None and not args.recover_again:  # trained already: nothing for the GPU
                append_row(row["model"], reused_row(bench, row, prepared, earlier))
                continue
            jobs.append(plan_job(bench, row, prepared))
        except Exception as exc:  # a failing row is reported and skipped; the grid goes on
            print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        tmp = jobs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(jobs, indent=1))
        tmp.replace(jobs_path)


def cmd_ingest(args) -> None:
    done = finished_ids(redo_stale=True)  # a stale row is replaced by a current one
    results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    todo = [r for r in results if r.get("ok") and r["id"] not in done and "row" in r["job"]]
    print(f"{len(todo)} rows to ingest", flush=True)
    bench = Bench() if todo else None
    for result in todo:
        job, row = result["job"], result["job"]["row"]
        key = bench.pt2_model(row["model"]) if row["method"] == "data-free-bn-inversion" else row["model"]
        original = bench.models[key]
        pruned = bench.gp.load(filter_model_path(row["model"], job["removed"]["channel_ratio"])) \
            if job.get("filter_model") else bench.gp.drop_blocks(original, job["drop"])
        prepared = {"original": original, "removed": job["removed"]}
        recovery = {"settings": {**job["recovery"], "seed": row["seed"]}, "final_loss": result["final_loss"],
                    "device": result.get("device"), "seconds": result["seconds"]}
        top1 = {name: value["after"] for name, value in result["eval"].items()}
        done_row = finish_row(bench, row, prepared, pruned, top1, recovery, job["prepare_s"] + result["seconds"])
        append_row(row["model"], done_row)
        print(f"{done_row['id']}: top-1 {100 * top1['lossless1000']:.2f}  cut {done_row['latency_cut_measured']:.3f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    add_row_arguments(plan)
    plan.add_argument("--recover-again", action="store_true",
                      help="plan a GPU recovery even where another CPU of the same vendor already recovered the network")
    plan.set_defaults(fn=cmd_plan)
    ingest = sub.add_parser("ingest")
    ingest.add_argument("results")
    ingest.set_defaults(fn=cmd_ingest)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
