"""Run benchmark jobs (block scoring, recovery + evaluation) in parallel worker processes.

Used by the benchmark scripts on this machine (CPU) and on a lent GPU machine, where many small
recoveries share one GPU. A job is a JSON object; its result is appended as one JSON line to the
output file as soon as it finishes, and jobs whose ``id`` is already there are skipped, so a run
that is killed resumes where it stopped.

    python -m benchmarks.jobs JOBS.json RESULTS.jsonl --device cuda --workers 8

Job kinds:
* ``score``: ``{"id", "kind": "score", "model", "data", "samples", "seed", "estimator", "iterations",
  "optimizer", "lr"}`` (a job without optimizer and lr: the paper's SGD at lr 0.02)
  -> per-block recoverability and seconds.
* ``recover``: ``{"id", "kind": "recover", "model", "data", "samples", "seed", "drop": [...],
  "recovery": {RecoverySettings fields}, "eval": {"name": path, ...}}`` -> top-1 per eval set
  before and after recovery, and seconds. ``"filter_model"`` may replace ``"drop"`` with the path
  of an already pruned ONNX model; ``"data"`` may be a ``.pt`` of ``{"images", "labels"}`` tensors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

_MODELS: dict = {}
_DATA: dict = {}


def _model(path: str):
    import graphprune as gp

    if path not in _MODELS:
        _MODELS[path] = gp.load(path)
    return _MODELS[path]


def _tiny(path: str, shape, samples, seed):
    """A tiny set drawn from an image source, or one saved whole as tensors (``.pt``: synthetic or
    resized images, exactly as the planning machine made them)."""
    import torch

    from graphprune.data import Preprocessing, TinySet, load_tiny_set

    key = (path, tuple(shape), samples, seed)
    if key not in _DATA:
        if path.endswith(".pt"):
            saved = torch.load(path, weights_only=True)
            _DATA[key] = TinySet(saved["images"], saved["labels"], path)
        else:
            _DATA[key] = load_tiny_set(path, Preprocessing(tuple(shape)), samples, seed)
    return _DATA[key]


def run_job(job: dict, device: str) -> dict:
    import torch

    import graphprune as gp
    from graphprune.data import split_holdout
    from graphprune.evaluate import evaluate
    from graphprune.passes.recover import RecoverySettings, recover
    from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks

    # full float32 on GPUs too (no TF32 convolutions), so results compare with CPU runs
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    model = _model(job["model"])
    shape = tuple(model.analysis_shape())[1:]
    tiny = _tiny(job["data"], shape, job.get("samples"), job["seed"])
    torch.manual_seed(job["seed"])
    if job["kind"] == "score":
        train, holdout = split_holdout(tiny, seed=job["seed"])
        settings = RecoverabilitySettings(estimator=job["estimator"], iterations=job.get("iterations", 0),
                                          optimizer=job.get("optimizer", "sgd"), lr=job.get("lr", 0.02),
                                          seed=job["seed"], device=device, batch_size=job.get("batch_size", 64))
        blocks = gp.find_blocks(model)
        scores = score_blocks(model, blocks, train, holdout, settings, show_progress=False)
        return {"scores": {s.name: s.recoverability for s in scores},
                "before_fit": {s.name: s.before_fit for s in scores}, "seconds": time.perf_counter() - start}
    if job["kind"] == "recover":
        pruned = _model(job["filter_model"]) if job.get("filter_model") else gp.drop_blocks(model, job["drop"])
        settings = RecoverySettings(**{**job.get("recovery", {}), "device": device, "seed": job["seed"]})
        recovered, record = recover(pruned, model, tiny, settings, show_progress=False)
        result = {"seconds": time.perf_counter() - start, "final_loss": record["final_loss"], "eval": {},
                  "device": torch.cuda.get_device_name() if device.startswith("cuda") else device}
        for name, path in job.get("eval", {}).items():
            test = _tiny(path, shape, None, 0)
            result["eval"][name] = {"before": evaluate(pruned, test)["top1"], "after": evaluate(recovered, test)["top1"]}
        return result
    raise ValueError(f"unknown job kind {job['kind']}")


def _worker(queue, out_path, device, threads):
    import torch

    torch.set_num_threads(threads)
    while True:
        job = queue.get()
        if job is None:
            return
        try:
            result = {"id": job["id"], "job": job, "ok": True, **run_job(job, device)}
        except Exception as exc:  # record and continue: one bad job must not stop the batch
            result = {"id": job["id"], "job": job, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-2000:]}
        with open(out_path, "a") as fh:  # one short line per job: appends do not interleave
            fh.write(json.dumps(result) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {job['id']} {'ok' if result['ok'] else result['error']}", flush=True)


def done_ids(out_path: Path) -> set[str]:
    if not out_path.exists():
        return set()
    ids = set()
    for line in out_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: that job runs again
        if record.get("ok"):
            ids.add(record["id"])
    return ids


def run_jobs(jobs: list[dict], out_path: Path, device: str = "cpu", workers: int = 1, threads: int = 1) -> None:
    todo = [j for j in jobs if j["id"] not in done_ids(out_path)]
    print(f"{len(jobs) - len(todo)} jobs already done, {len(todo)} to run on {device} with {workers} workers",
          flush=True)
    if not todo:
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for job in todo:
        queue.put(job)
    procs = [ctx.Process(target=_worker, args=(queue, str(out_path), device, threads)) for _ in range(workers)]
    for _ in procs:
        queue.put(None)
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    run_jobs(json.loads(Path(args.jobs).read_text()), Path(args.out), args.device, args.workers, args.threads)


if __name__ == "__main__":
    main()
