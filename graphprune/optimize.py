"""``optimize``: the PRACTISE pipeline as one short list of named, timed steps.

    find_blocks -> profile_blocks -> pool_identical_blocks -> score_recoverability
    -> select_blocks -> refine_selection -> drop_blocks -> recover -> measure_result

Each step is a pass from :mod:`graphprune.passes` (callable on its own from Python); this module
only wires them together, caches per-block work so an interrupted run resumes, and assembles the
report. The tiny set is split once: the held-out part measures recoverability, and recovery then
trains on every image.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .backends.base import LatencySettings, get_backend
from .cache import JsonCache, model_fingerprint, settings_fingerprint, tensor_fingerprint
from .data import TinySet, split_holdout
from .errors import GraphpruneError
from .formats.input_layout import looks_channels_last
from .model import HALF_DTYPES, Model
from .passes import DropBlocks, FindBlocks, PassResult, PassState, Pipeline, Step
from .passes.measure_latency import MeasureBlockLatency, measure_cut
from .passes.pool_latency import PoolIdenticalBlocks
from .passes.recover import Recover, RecoverySettings, check_recovery
from .passes.recoverability import Recoverability, RecoverabilitySettings
from .passes.refine_selection import RefineSelection, RefineSettings
from .passes.select_blocks import SelectBlocks


@dataclass(frozen=True)
class OptimizeConfig:
    latency_cut: float = 0.22
    backend: str = "onnxruntime"
    latency: LatencySettings = LatencySettings()
    margin: float = 0.005  # select until the measured cut reaches latency_cut + margin
    holdout_fraction: float = 0.2
    holdout_minimum: int = 16
    seed: int = 0
    feature_node: str | None = None
    recoverability: RecoverabilitySettings = RecoverabilitySettings()
    refine: RefineSettings = RefineSettings()
    recovery: RecoverySettings = RecoverySettings()
    cache_dir: str | None = None
    show_progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OptimizeResult:
    model: Model
    state: PassState
    report: dict = field(default_factory=dict)


def image_input_shape(model: Model) -> tuple[int, int, int]:
    """(C, H, W) of the model's one image input; a one-line error for any other kind of model."""
    if len(model.inputs) != 1:
        names = ", ".join(spec.name for spec in model.inputs)
        raise GraphpruneError(f"optimize needs a model with one image input; "
                              f"this one has {len(model.inputs)} ({names})")
    shape = tuple(model.analysis_shape())
    if len(shape) != 4:
        raise GraphpruneError(f"optimize needs an image model (N, C, H, W input); this one takes {shape}")
    if any(p.dtype in HALF_DTYPES for p in model.graph_module.parameters()):
        raise GraphpruneError("optimize needs float32 weights: this half-precision graph could not be run in "
                              "float32 (it casts to half inside); export it in float32")
    if looks_channels_last(shape):  # ONNX files get a channels-first view on load (input_layout.py)
        raise GraphpruneError(f"the model's input {shape} looks channels-last (N, H, W, C); optimize needs "
                              "channels-first (N, C, H, W) input: export the model with NCHW input")
    return shape[1:]


def optimize(model: Model, tiny: TinySet, config: OptimizeConfig = OptimizeConfig()) -> OptimizeResult:
    """Drop blocks until the measured latency cut reaches ``config.latency_cut``, then recover."""
    if not 0 < config.latency_cut < 1:
        raise GraphpruneError(f"--latency-cut must be between 0 and 1 (exclusive), got {config.latency_cut}")
    image_input_shape(model)
    check_recovery(model, tiny, config.recovery, config.feature_node)
    backend = get_backend(config.backend)
    train, holdout = split_holdout(tiny, config.holdout_fraction, config.holdout_minimum, config.seed)
    caches = _caches(model, tiny, config)
    steps = [
        Step("find_blocks", FindBlocks()),
        Step("profile_blocks", MeasureBlockLatency(backend, config.latency, cache=caches["latency"],
                                                   progress=None if config.show_progress else False)),
        Step("pool_identical_blocks", PoolIdenticalBlocks()),
        Step("score_recoverability", Recoverability(train, holdout, config.recoverability, config.feature_node,
                                                    config.show_progress, caches["recoverability"])),
        Step("select_blocks", SelectBlocks(config.latency_cut, backend, config.latency, config.margin,
                                           caches["selection"])),
        Step("refine_selection", RefineSelection(train, holdout, config.recoverability, config.latency_cut, backend,
                                                 config.latency, config.margin, config.refine, config.feature_node,
                                                 caches["joint"], caches["selection"])),
        Step("drop_blocks", DropBlocks()),
        Step("recover", Recover(model, tiny, config.recovery, config.feature_node, config.show_progress)),
        Step("measure_result", _measure_result(backend, model, config)),
    ]
    state = PassState(model)
    Pipeline(steps).run(model, state)
    return OptimizeResult(state.model, state, build_report(model, state, tiny, train, holdout, config))


def _caches(model: Model, tiny: TinySet, config: OptimizeConfig) -> dict[str, JsonCache]:
    model_key = model_fingerprint(model)
    latency_key = settings_fingerprint(model_key, config.backend, config.latency.to_dict())
    score_key = settings_fingerprint(model_key, tensor_fingerprint(tiny.images), asdict(config.recoverability),
                                     config.seed, config.holdout_fraction, config.holdout_minimum,
                                     config.feature_node)
    return {"latency": JsonCache(config.cache_dir, "latency", latency_key),
            "selection": JsonCache(config.cache_dir, "selection", latency_key),
            "recoverability": JsonCache(config.cache_dir, "recoverability", score_key),
            "joint": JsonCache(config.cache_dir, "joint", settings_fingerprint(score_key, config.refine.joint_iterations))}


def _measure_result(backend, original: Model, config: OptimizeConfig):
    """An independent interleaved timing of the final model against the original."""
    def step(model: Model, state: PassState) -> PassResult:
        cut = measure_cut(backend, original, model, config.latency)
        state.artifacts["final_cut"] = cut
        return PassResult(model, record=cut.to_dict(), value=cut)
    return step


def build_report(original: Model, state: PassState, tiny: TinySet, train: TinySet, holdout: TinySet,
                 config: OptimizeConfig) -> dict:
    """The JSON report: per-block scores, the choice, latency, settings and time per stage."""
    selection = state.artifacts["selection"]
    latency = {row.name: row for row in state.artifacts["block_latency"].rows}
    pooled = state.artifacts["pooled_latency"].saved_fractions()
    scores = {s.name: s for s in selection.scores}
    recoverability = {r.name: r for r in state.artifacts["recoverability"]}
    blocks = []
    for block in state.artifacts["blocks"]:
        row, score, rec = latency.get(block.name), scores.get(block.name), recoverability.get(block.name)
        blocks.append({
            "name": block.name, "kind": block.kind, "macs": block.macs, "params": block.params,
            "recoverability": rec.recoverability if rec else None,
            "recoverability_relative": rec.relative if rec else None,
            "saved_ms": row.saved_ms if row else None, "saved_fraction": row.saved_fraction if row else None,
            "saved_fraction_pooled": pooled.get(block.name),
            "score": score.to_dict()["score"] if score else None,
            "dropped": block.name in selection.blocks,
        })
    final = state.artifacts["final_cut"]
    return {
        "model": original.name,
        "dropped": selection.blocks,
        "latency": {"original_ms": final.original.median_ms, "optimized_ms": final.candidate.median_ms,
                    "cut": final.cut, "target": config.latency_cut,
                    "selection_cut": selection.cut.cut, "original_stats": final.original.to_dict(),
                    "optimized_stats": final.candidate.to_dict()},
        "blocks": blocks,
        "identical_blocks": state.records["pool_identical_blocks"]["groups"],
        "selection_measurements": selection.measurements,
        "refinement": state.records["refine_selection"],
        "data": {**tiny.summary(), "train_for_scoring": len(train), "held_out_for_scoring": len(holdout),
                 "train_for_recovery": len(tiny)},
        "recovery": {k: state.records["recover"].get(k) for k in ("loss_curve", "final_loss", "seconds")},
        "settings": {**config.to_dict(), "backend_info": state.artifacts["block_latency"].backend_info},
        "seconds_per_stage": dict(state.timings),
        "resumed_from_cache": {"latency_rows": state.records["profile_blocks"].get("from_cache", 0),
                               "recoverability": state.records["score_recoverability"].get("from_cache", 0)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
