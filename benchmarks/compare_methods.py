"""graphprune against its peers on real weights and real images (CIFAR-10 ResNet-56/20, as ONNX).

Every row: one method, model, tiny-set size, seed and latency-cut target. Methods share the tiny
set (train_lossless_4000, drawn with the seed), the measured-cut rule and the recovery budget:

* ``graphprune``      recoverability / measured latency saved; feature-mimicking recovery
* ``graphprune-bp``   the same blocks; cross-entropy fine-tuning with labels (classifier frozen)
* ``block-influence`` blocks ranked by ShortGPT's Block Influence; mimicking recovery
* ``random-blocks``   blocks in a seeded random order; mimicking recovery
* ``filter-l1``       inner channels of every block pruned by L1 magnitude (Torch-Pruning) at the
                      ratio that reaches the measured cut; mimicking recovery
* ``no-recovery``     graphprune's blocks, no training
* ``ood-imagenet``    graphprune with the 200 ImageNet photos of shared/data as the tiny set
* ``data-free-procedural``    graphprune on procedural synthetic images (ONNX input)
* ``data-free-bn-inversion``  graphprune on BatchNorm-inversion images (a ``.pt2`` program with BatchNorm)

Blocks are added until the *measured* cut (onnxruntime, CPU, 1 thread, batch 1, interleaved with
the original) reaches the target + 0.005. Each finished row then re-measures its written model's
cut independently and evaluates top-1 on test_lossless_1000 (exact pixels) and test.npz (10k,
JPEG-degraded: compare methods only). Rows are appended to ``benchmarks/results/<model>.json`` as
they finish; a rerun skips finished rows; block scores are cached per model and tiny set.

    python -m benchmarks.compare_methods run [--only graphprune,block-influence] [--grid main|samples|r20|all]
    python -m benchmarks.compare_methods report
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, replace

from benchmarks.common import CACHE, DATA, WEIGHTS, ensure_models, run_report_main
from benchmarks.compare_rows import (DATA_METHODS, GRAPHPRUNE_SELECTED, MAIN_METHODS, append_row, earlier_recovery,
                                     is_stale, load_rows, recovery_settings, selection_settings, this_machine)
from benchmarks.filter_l1 import filter_pruned

MARGIN = 0.005
BN_INVERSION_IMAGES = 256  # a 2-core CPU synthesises about 256 images in 5-7 minutes
BN_INVERSION_STEPS = 200
LATENCY = dict(batch_size=1, threads=1, min_time_s=0.5)


def grid(name: str) -> list[dict]:
    """Rows in the order they should run: seed by seed, so that a partial run already compares
    every method on the same tiny sets."""
    rows = []
    for seed in (2021, 2022, 2023, 2024, 2025):
        if name in ("main", "all"):
            for cut in (0.40, 0.22):
                rows += [dict(method=m, model="resnet56", samples=500, seed=seed, cut=cut) for m in MAIN_METHODS]
        if name in ("data", "all") and seed <= 2023:  # issue 6: other domains, no data
            rows += [dict(method=m, model="resnet56", samples=500, seed=seed, cut=0.22) for m in DATA_METHODS]
        if name in ("samples", "all") and seed <= 2023:
            rows += [dict(method="graphprune", model="resnet56", samples=n, seed=seed, cut=0.22) for n in (50, 100, 1000)]
        if name in ("r20", "all") and seed <= 2023:
            rows += [dict(method=m, model="resnet20", samples=500, seed=seed, cut=0.22)
                     for m in ("graphprune", "block-influence", "filter-l1")]
    return rows


def row_id(row: dict) -> str:
    return f"{row['method']}/{row['model']}/{row['samples']}/{row['seed']}/{row['cut']}"


class Bench:
    """Loaded models, data and caches shared by the rows of one run."""

    def __init__(self):
        import graphprune as gp
        from graphprune.backends.base import LatencySettings, get_backend
        from graphprune.data import Preprocessing, load_tiny_set

        self.gp = gp
        self.paths = ensure_models()
        self.models = {name: gp.load(path) for name, path in self.paths.items()}
        self.backend = get_backend("onnxruntime")
        self.latency = LatencySettings(**LATENCY)
        prep = Preprocessing((3, 32, 32))
        self.tests = {"lossless1000": load_tiny_set(DATA["test_lossless"], prep),
                      "jpeg10k": load_tiny_set(DATA["test_jpeg"], prep)}
        self._tiny = lambda n, seed: load_tiny_set(DATA["train"], prep, n, seed)
        self.block_latency = {}

    def row_inputs(self, row: dict):
        """(model key, tiny set, description of the tiny set) for a row."""
        from graphprune.data import Preprocessing, load_tiny_set
        from graphprune.synthesis import SynthesisSettings, synthetic_tiny_set

        prep = Preprocessing((3, 32, 32))
        method, samples, seed = row["method"], row["samples"], row["seed"]
        if method == "ood-imagenet":  # 200 photos: fewer than asked for, all of them used
            tiny = load_tiny_set(DATA["imagenet"], prep, samples, seed)
            return row["model"], tiny, f"imagenet-samples ({len(tiny)} photos)"
        if method == "data-free-procedural":
            tiny, _ = synthetic_tiny_set(self.models[row["model"]], SynthesisSettings("procedural", samples, seed),
                                         prep, CACHE)
            return row["model"], tiny, f"procedural ({samples})"
        if method == "data-free-bn-inversion":
            key = self.pt2_model(row["model"])
            settings = SynthesisSettings("bn-inversion", BN_INVERSION_IMAGES, seed, steps=BN_INVERSION_STEPS)
            tiny, _ = synthetic_tiny_set(self.models[key], settings, prep, CACHE, show_progress=False)
            return key, tiny, f"bn-inversion ({BN_INVERSION_IMAGES} images, {BN_INVERSION_STEPS} steps per batch of 64)"
        return row["model"], self._tiny(samples, seed), f"train_lossless_4000 ({samples}, seed {seed})"

    def pt2_model(self, name: str) -> str:
        """The pretrained model as a torch.export program (BatchNorm kept), loaded from .pt2."""
        key = f"{name}_pt2"
        if key not in self.models:
            path = CACHE / f"cifar10_{name}.pt2"
            if not path.exists():
                self.gp.save(self.gp.load(f"zoo:cifar10_{name}", weights=str(WEIGHTS[name])), path)
            self.paths[key] = str(path)
            self.models[key] = self.gp.load(path)
        return key

    def latency_table(self, model: str):
        """The per-block table measured on this machine, with savings pooled over identical blocks
        as ``graphprune optimize`` pools them (``graphprune.passes.pool_latency``)."""
        from graphprune.cache import JsonCache, model_fingerprint, settings_fingerprint
        from graphprune.passes.measure_latency import measure_block_latency
        from graphprune.passes.pool_latency import identical_groups, pool_savings

        if model not in self.block_latency:
            m = self.models[model]
            blocks = self.gp.find_blocks(m)
            cache = JsonCache(CACHE, "latency", settings_fingerprint(model_fingerprint(m), "onnxruntime", LATENCY))
            table = measure_block_latency(self.backend, m, self.latency, blocks, False, cache=cache)
            self.block_latency[model] = (table, pool_savings(table, identical_groups(m, blocks)))
        return self.block_latency[model][1]

    def score_records(self, model: str, tiny, seed: int, settings) -> list:
        """Recoverability (``settings``: a RecoverabilitySettings, its seed replaced by ``seed``),
        cached per block like ``graphprune optimize`` caches it."""
        from graphprune.cache import JsonCache
        from graphprune.data import split_holdout
        from graphprune.passes.recoverability import score_blocks

        m = self.models[model]
        settings = replace(settings, seed=seed)
        cache = JsonCache(CACHE, "recoverability", self.score_key(model, tiny, settings))
        train, holdout = split_holdout(tiny, seed=seed)
        return score_blocks(m, self.gp.find_blocks(m), train, holdout, settings, show_progress=False, cache=cache)

    def score_key(self, model: str, tiny, settings) -> str:
        from graphprune.cache import model_fingerprint, settings_fingerprint, tensor_fingerprint

        return settings_fingerprint(model_fingerprint(self.models[model]), tensor_fingerprint(tiny.images),
                                    settings.__dict__)

    def scores(self, model: str, tiny, seed: int, settings) -> dict[str, float]:
        return {r.name: r.recoverability for r in self.score_records(model, tiny, seed, settings)}


def select(bench: Bench, model: str, order: list[str], cut: float):
    from graphprune.passes.select_blocks import block_scores, select_blocks

    m = bench.models[model]
    scores = block_scores({name: 0.0 for name in order}, bench.latency_table(model))
    return select_blocks(m, bench.gp.find_blocks(m), scores, cut, bench.backend, bench.latency, MARGIN, order=order)


def block_order(bench: Bench, row: dict, tiny, key: str) -> list[str]:
    from graphprune.optimize import OptimizeConfig
    from graphprune.passes.recoverability import RecoverabilitySettings
    from graphprune.passes.select_blocks import block_scores

    table = bench.latency_table(key)
    method = row["method"]
    if method == "random-blocks":
        names = sorted(table.saved_fractions())
        random.Random(row["seed"]).shuffle(names)
        return names
    if method == "block-influence":
        influence = bench.scores(key, tiny, row["seed"], RecoverabilitySettings(estimator="influence", iterations=0))
        return sorted(influence, key=influence.get)
    defaults = OptimizeConfig().recoverability
    rec = bench.scores(key, tiny, row["seed"], defaults)
    return [s.name for s in block_scores(rec, table) if s.saved_fraction > 0]


def refine(bench: Bench, row: dict, key: str, tiny, greedy):
    """graphprune's refinement of a greedy selection by joint recoverability (the product's pass,
    ``graphprune.passes.refine_selection``), joint fits cached per model and tiny set."""
    from graphprune.data import split_holdout
    from graphprune.optimize import OptimizeConfig
    from graphprune.passes import BlockRecoverabilities, Blocks, PassContext
    from graphprune.passes.refine_selection import RefineSelection

    config = OptimizeConfig()
    scoring = replace(config.recoverability, seed=row["seed"])
    m = bench.models[key]
    train, holdout = split_holdout(tiny, seed=row["seed"])
    ctx = PassContext(m, tiny=tiny, train=train, holdout=holdout, backend=bench.backend, latency=bench.latency,
                      latency_cut=row["cut"], margin=MARGIN, cache_dir=str(CACHE), show_progress=False)
    recoverabilities = BlockRecoverabilities(bench.score_records(key, tiny, row["seed"], scoring), scoring)
    pooled = bench.latency_table(key)
    measured = bench.block_latency[key][0]
    result = RefineSelection(config.refine)(m, ctx, Blocks(bench.gp.find_blocks(m)), greedy, measured, pooled,
                                            recoverabilities)
    return result.artifacts[0], result.record


# baselines defined by graphprune's blocks: recovered with labels instead, or not recovered
SAME_BLOCKS_AS_GRAPHPRUNE = ("graphprune-bp", "no-recovery")


def graphprune_row(row: dict) -> dict | None:
    """The finished graphprune row whose blocks ``row`` (a SAME_BLOCKS_AS_GRAPHPRUNE method) takes:
    same model, tiny set, seed and target, its cut measured on this CPU with today's selection
    settings. Selecting again would cost the whole selection (joint fits included) and, since
    latency measurements vary, could pick other blocks than the row the baseline is compared with
    (on the reference Xeon 3 of 5 40% graphprune-bp rows had other blocks than graphprune's)."""
    here, today = this_machine(), selection_settings()
    for r in load_rows(row["model"]):
        if r["method"] == "graphprune" and r.get("cpu") == here and r["removed"].get("selection") == today \
                and (r["samples"], r["seed"], r["latency_cut_target"]) == (row["samples"], row["seed"], row["cut"]):
            return r
    return None


def prepare_row(bench: Bench, row: dict) -> dict:
    """Everything of a row but its recovery: the tiny set, the blocks (or channels) removed, chosen
    with latency measured on this machine (or, for the baselines defined by graphprune's blocks,
    taken from its row, ``graphprune_row``, where there is one). ``pruned`` is the un-recovered model."""
    from graphprune.passes.select_blocks import SELECTION_RULE

    start = time.perf_counter()
    key, tiny, source = bench.row_inputs(row)
    original = bench.models[key]
    prepared = {"key": key, "tiny": tiny, "original": original, "removed": {"tiny_set": source}, "start": start}
    same_as = graphprune_row(row) if row["method"] in SAME_BLOCKS_AS_GRAPHPRUNE else None
    if row["method"] == "filter-l1":
        pruned, ratio = filter_pruned(bench, row, MARGIN)
        prepared["removed"]["channel_ratio"] = ratio
    elif same_as is not None:
        prepared["removed"].update({k: v for k, v in same_as["removed"].items() if k != "tiny_set"},
                                   blocks_of=same_as["id"])
        pruned = bench.gp.drop_blocks(original, same_as["removed"]["blocks"])
    else:
        selection = select(bench, key, block_order(bench, row, tiny, key), row["cut"])
        if row["method"] in GRAPHPRUNE_SELECTED:
            selection, record = refine(bench, row, key, tiny, selection)
            prepared["removed"].update(selection=selection_settings(), greedy_blocks=record["greedy"],
                                       joint_fits=len(record.get("evaluations", [])))
        pruned = bench.gp.drop_blocks(original, selection.blocks)
        prepared["removed"].update(blocks=selection.blocks, selection_cut=selection.cut.cut,
                                   selection_rule=SELECTION_RULE)
    prepared["pruned"] = pruned
    return prepared


def finish_row(bench: Bench, row: dict, prepared: dict, model, top1: dict, recovery: dict, wall_s: float) -> dict:
    """The row: ``model``'s cut re-measured independently against the original, with its top-1."""
    from graphprune.backends.environment import cpu_signature
    from graphprune.passes.measure_latency import measure_cut

    cut = measure_cut(bench.backend, prepared["original"], model, bench.latency)
    return {
        "id": row_id(row), "method": row["method"], "model": row["model"], "samples": row["samples"],
        "seed": row["seed"], "latency_cut_target": row["cut"], "latency_cut_measured": cut.cut,
        "latency_ms": {"original": cut.original.median_ms, "optimized": cut.candidate.median_ms},
        "top1_lossless1000": top1["lossless1000"], "top1_jpeg10k": top1["jpeg10k"],
        "removed": prepared["removed"], "recovery": recovery, "wall_s": wall_s,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": this_machine(),
        "cpu_signature": cpu_signature(),
    }


def reused_row(bench: Bench, row: dict, prepared: dict, earlier: dict) -> dict:
    """The row finished with ``earlier``'s top-1 (the same network recovered on another CPU of the
    same vendor, ``earlier_recovery``), its cut re-measured here, its source named."""
    top1 = {"lossless1000": earlier["top1_lossless1000"], "jpeg10k": earlier["top1_jpeg10k"]}
    recovery = {**earlier["recovery"], "reused_from": earlier["recovery"].get("reused_from")
                or {"cpu": earlier["cpu"], "finished": earlier["finished"]}}
    return finish_row(bench, row, prepared, prepared["pruned"], top1, recovery, time.perf_counter() - prepared["start"])


def run_row(bench: Bench, row: dict, reuse: bool = True) -> dict:
    """A whole row on this machine: prepare, recover, write the model, re-measure and evaluate it;
    or, with ``reuse`` where another CPU already recovered the same network (``earlier_recovery``),
    prepare and re-measure the cut here and take that recovery's top-1, naming its source."""
    from graphprune.evaluate import evaluate
    from graphprune.passes.recover import recover

    gp = bench.gp
    prepared = prepare_row(bench, row)
    original, pruned = prepared["original"], prepared["pruned"]
    settings = recovery_settings(row)
    earlier = None if row["method"] == "no-recovery" else earlier_recovery(row, prepared["removed"], asdict(settings))
    if reuse and earlier is not None:
        return reused_row(bench, row, prepared, earlier)
    recovered, record = (pruned, {}) if row["method"] == "no-recovery" else \
        recover(pruned, original, prepared["tiny"], settings, show_progress=False)
    out = CACHE / "rows" / (row_id(row).replace("/", "_") + (".pt2" if original.source == "pt2" else ".onnx"))
    out.parent.mkdir(parents=True, exist_ok=True)
    gp.save(recovered, out)
    written = gp.load(out)
    top1 = {name: evaluate(written, test)["top1"] for name, test in bench.tests.items()}
    recovery = {"settings": record.get("settings"), "final_loss": record.get("final_loss")}
    if earlier is not None:  # recovered again although another CPU had: the evidence for reuse
        recovery["earlier_top1"] = {"cpu": earlier["cpu"], "lossless1000": earlier["top1_lossless1000"],
                                    "jpeg10k": earlier["top1_jpeg10k"]}
    return finish_row(bench, row, prepared, written, top1, recovery, time.perf_counter() - prepared["start"])


def add_row_arguments(parser) -> None:
    parser.add_argument("--grid", default="all", choices=["main", "data", "samples", "r20", "all"])
    parser.add_argument("--only", help="comma-separated methods")
    parser.add_argument("--limit", type=int, help="at most this many rows")
    parser.add_argument("--cut", type=float, help="only rows with this latency-cut target")
    parser.add_argument("--redo-stale", action="store_true",
                        help="also redo rows measured on another CPU, and graphprune-selected rows whose blocks "
                             "were chosen with earlier defaults")


def finished_ids(redo_stale: bool = False) -> set[str]:
    return {r["id"] for model in ("resnet56", "resnet20") for r in load_rows(model)
            if not (redo_stale and is_stale(r))}


def rows_to_do(args, also_done: set[str] = frozenset()) -> list[dict]:
    """The grid's rows that ``--grid``/``--only`` select, minus finished ones, up to ``--limit``."""
    rows = [r for r in grid(args.grid) if (not args.only or r["method"] in args.only.split(","))
            and (args.cut is None or abs(r["cut"] - args.cut) < 1e-9)]
    done = finished_ids(getattr(args, "redo_stale", False)) | set(also_done)
    todo = [r for r in rows if row_id(r) not in done]
    print(f"{len(rows) - len(todo)} rows done, {len(todo)} to do", flush=True)
    return todo[: args.limit or None]


def cmd_run(args) -> None:
    todo = rows_to_do(args)
    if not todo:
        return
    bench = Bench()
    for row in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {row_id(row)} ...", flush=True)
        try:
            result = run_row(bench, row, reuse=not args.recover_again)
        except Exception as exc:  # a failing row is reported and skipped; the grid goes on
            print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        append_row(row["model"], result)
        reused = " (recovery reused from " + result["recovery"]["reused_from"]["cpu"] + ")" \
            if "reused_from" in result["recovery"] else ""
        print(f"    top-1 {100 * result['top1_lossless1000']:.2f}  cut {result['latency_cut_measured']:.3f}  "
              f"{result['wall_s']:.0f}s{reused}", flush=True)


def cmd_report(args) -> None:
    from benchmarks.compare_report import write_report

    write_report()


def run_options(run) -> None:
    add_row_arguments(run)
    run.add_argument("--recover-again", action="store_true",
                     help="recover every row, even where another CPU already recovered the same network")


if __name__ == "__main__":
    run_report_main(__doc__, cmd_run, cmd_report, run_options)
