"""``optimize``: the PRACTISE pipeline as one short list of named, timed steps.

    find_blocks -> add_layers -> profile_blocks -> pool_identical_blocks -> check_reachable
    -> score_recoverability -> select_blocks -> refine_selection -> drop_blocks -> recover -> measure_result

With ``quantize="auto"`` or ``"int8"`` one target is met by the cheapest mix of block dropping and
int8: ``plan_quantization`` follows find_blocks and ``quantize_result`` follows recover
(:mod:`graphprune.passes.plan_quantization`); every measuring step times candidates quantised,
against the float original, and :func:`write_result` writes the quantised file.

With ``lever="resolution"`` the block steps give way to ``choose_resolution -> resize_input``: the
network runs behind a resize at its entry, the largest internal size measured at the target, and
nothing is trained (:mod:`graphprune.passes.choose_resolution`). With ``lever="auto"`` both lists
run on one context and the written model closer to the original on the held-out images is kept
(:mod:`graphprune.choose_lever`).

:func:`default_pipeline` is that list; a user edits it (insert, replace, remove passes) and hands
it to :func:`optimize`, which builds the :class:`~graphprune.passes.PassContext` (backend, latency
settings, the target, the tiny set split once: the held-out part measures recoverability, recovery
trains on every image; resume caches), checks the order, runs it, and assembles the report from the
typed artefacts the steps left. Each step is a pass from :mod:`graphprune.passes`, callable on its
own from Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .backends.base import LatencySettings, get_backend
from .choose_lever import optimize_auto
from .data import Preprocessing, TinySet, split_holdout
from .errors import GraphpruneError, shown
from .features import describe_targets
from .formats.input_layout import looks_channels_last
from .formats.model_io import atomic_write, save
from .model import HALF_DTYPES, Model
from .passes import (AddLayers, BlockLatencyTable, BlockRecoverabilities, Blocks, CheckFidelity, CheckReachable, ChooseResolution,
                     DropBlocks, ResizeInput, ResolutionChoice,
                     FinalCut, FindBlocks, HeldOutFidelity, MeasureBlockLatency, MeasureResult, Pass, PassContext, PassState,
                     Pipeline, PlanQuantization, PooledLatency, PoolIdenticalBlocks, QuantizationPlan, QuantizedOnnx,
                     QuantizeResult, Recover, Recoverability, RecoveryLog, Refinement, RefineSelection, SelectBlocks,
                     Selection, available_passes)
from .passes.add_layers import check_layers_mode
from .passes.plan_quantization import check_quantize_mode, no_block_needed
from .passes.quantize import QuantizeSettings
from .passes.recover import RecoverySettings
from .passes.recoverability import RecoverabilitySettings
from .passes.resize_input import runs_smaller
from .passes.refine_selection import RefineSettings

log = logging.getLogger("graphprune")
LEVERS = ("blocks", "resolution", "auto")


@dataclass(frozen=True)
class OptimizeConfig:
    latency_cut: float = 0.22
    backend: str = "onnxruntime"
    latency: LatencySettings = LatencySettings()
    margin: float = 0.005  # select until the measured cut reaches latency_cut + margin
    resolution_margin: float = 0.015  # the resolution lever's margin (passes/choose_resolution.py)
    holdout_fraction: float = 0.2
    holdout_minimum: int = 16
    seed: int = 0
    feature_node: str | None = None
    recoverability: RecoverabilitySettings = RecoverabilitySettings()
    refine: RefineSettings = RefineSettings()
    recovery: RecoverySettings = RecoverySettings()
    cache_dir: str | None = None
    show_progress: bool = True
    # "auto": int8 where it measures faster within the accuracy bound, off (saying why) where it cannot run
    # (a CUDA target, the torch backend, fewer than 16 images); "int8": always; "none": float only. "auto"
    # since ResNet-56 at a 0.65 cut kept top-1 within 1 point on 3 seeds (93.1, 92.8, 92.1 against 92.6)
    # and at 0.5 within 0.3 (int8 alone), EfficientNet-Lite0 at 0.22 and 0.5 lost nothing
    # (benchmarks/results/quantize_cuts.md, real_models.md)
    quantize: str = "auto"
    # what the result will be written as, where the caller knows ("onnx" or "pt2"): quantize "auto"
    # leaves int8 off for "pt2", since an int8 model is ONNX only
    output_format: str = "onnx"
    # seconds the whole run should take (None: no limit): int8 planning, profiling (past every distinct
    # block), scoring, refinement and recovery are sized to the time left when they start
    # (PassContext.stage_budget)
    time_budget_s: float | None = None
    quantization: QuantizeSettings = QuantizeSettings()
    # what is cut to reach the target: "blocks" (PRACTISE: drop residual blocks, then recover) or
    # "resolution" (the network behind a resize at its entry, the file's input unchanged; no training:
    # passes/choose_resolution.py), each composed with int8 as quantize says; "auto": both, the one
    # whose result stays closer to the original on the held-out images kept (choose_lever.py)
    lever: str = "blocks"
    # the plain layers outside a network's residual blocks (passes/add_layers.py): "auto" adds them to
    # the candidates where every block dropped falls short of the goal, "always", or "never". "never":
    # PP-OCRv4's detector at 15% (blocks alone: 5.1%) reached 15.1% with 6 of its backbone's layers and
    # 5 blocks, and its map IoU on 800 photos fell to 0.000 (a 900 s budget: 45 recovery steps), so the
    # layers are the user's choice; a target the blocks cannot reach names them
    layers: str = "never"

    def __post_init__(self):
        check_quantize_mode(self.quantize)
        check_layers_mode(self.layers)
        if self.lever not in LEVERS:
            raise GraphpruneError(f"lever must be one of {', '.join(LEVERS)}, got '{self.lever}'", parameter="lever")
        if self.output_format not in ("onnx", "pt2"):
            raise GraphpruneError(f"output_format must be onnx or pt2, got '{self.output_format}'",
                                  parameter="output_format")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise GraphpruneError(f"time_budget_s must be positive, got {self.time_budget_s}", parameter="time_budget_s")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OptimizeResult:
    model: Model
    state: PassState
    report: dict = field(default_factory=dict)


def with_recorded_normalisation(prep: Preprocessing, model: Model, given: bool) -> Preprocessing:
    """``prep`` with the normalisation the model's file records (an ultralytics export: [0, 1], no
    mean or std; a uint8 input: pixels, 0 to 255;
    :func:`~graphprune.formats.input_shape.recorded_normalisation`) where the user
    ``given`` none, saying so in one line; else ``prep``."""
    recorded = model.meta.get("recorded_normalisation")
    if given or not recorded:
        return prep
    channels, mean, std = prep.size[0], recorded["mean"], recorded["std"]
    log.warning("normalisation mean %g, std %s (inputs in [%g, %g]) from the file's %s; pass --mean and --std to "
                "use another", mean, "1/255" if std == 1 / 255 else f"{std:g}", (0 - mean) / std, (1 - mean) / std,
                recorded["source"].replace("metadata:", "metadata: "))
    return replace(prep, mean=(mean,) * channels, std=(std,) * channels)


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
    if any(p.dtype == torch.float64 for p in model.graph_module.parameters()):  # onnxruntime has no double Conv
        raise GraphpruneError("optimize needs float32 weights: this model's are float64; export it after "
                              "model.float()")
    if model.meta.get("batches_run") is False:  # formats/batch_axis.py could not free it, or found it false
        cause, export = _unbatched(model.meta)
        raise GraphpruneError(f"{cause}: optimize runs the tiny set in batches; export it {export}")
    if looks_channels_last(shape):  # ONNX files get a channels-first view on load (input_layout.py)
        raise GraphpruneError(f"the model's input {shape} looks channels-last (N, H, W, C); optimize needs "
                              "channels-first (N, C, H, W) input: export the model with NCHW input")
    return shape[1:]


def _unbatched(meta: dict) -> tuple[str, str]:
    """Why a batch of images cannot run, as ``formats/batch_axis.py`` and ``batch_trace.py`` found
    it, and the export that runs batches."""
    if meta.get("batch_on_axis_1"):
        return ("the model's graph fixes its batch at 1 and its output holds the batch on axis 1 ((T, N, C), a CTC "
                "recogniser's sequence-first layout)", "with a dynamic batch axis (graphprune reads such an output "
                "batch first), or with the batch first in its output")
    if meta.get("declared_batch"):
        return ("the model's input declares a dynamic batch, but a batch of 2 images does not give what each gives "
                "alone (an ultralytics export with nms=True keeps the first image's detections only)",
                "without nms=True")
    if meta.get("sizes_follow_values"):
        return ("the model's graph fixes its batch at 1 and holds NonZero or NonMaxSuppression (sizes that follow "
                "the values, such as an embedded NMS), which graphprune cannot free",
                "without NMS (ultralytics: nms=False) and with a dynamic batch axis")
    return ("the model's graph fixes its batch at 1 (a batch of 2 images does not give what each gives alone)",
            "with a dynamic batch axis")


def default_pipeline(config: OptimizeConfig = OptimizeConfig()) -> list[Pass]:
    """The PRACTISE pipeline: the list ``optimize`` runs unless given another; with ``quantize``
    other than ``"none"``, ``plan_quantization`` after find_blocks and ``quantize_result`` after recover.
    With ``lever="resolution"``: choose_resolution and resize_input instead of the block steps.
    ``lever="auto"`` is two pipelines (:mod:`graphprune.choose_lever`), not one list."""
    quantized = config.quantize != "none"
    if config.lever == "auto":
        raise GraphpruneError("lever 'auto' runs the default pipelines of both levers; a pipeline of its own "
                              "takes lever 'blocks' or 'resolution'", parameter="lever")
    if config.lever == "resolution":
        return [
            *([PlanQuantization.from_config(config)] if quantized else []),
            ChooseResolution.from_config(config),
            ResizeInput(),
            *([QuantizeResult.from_config(config)] if quantized else []),
            MeasureResult(),
            CheckFidelity(),
        ]
    return [
        FindBlocks(),
        *([PlanQuantization.from_config(config)] if quantized else []),
        AddLayers.from_config(config),
        MeasureBlockLatency(),
        PoolIdenticalBlocks(),
        CheckReachable(),
        Recoverability(config.recoverability),
        SelectBlocks(),
        RefineSelection(config.refine),
        DropBlocks(),
        Recover(config.recovery),
        *([QuantizeResult.from_config(config)] if quantized else []),
        MeasureResult(),
        CheckFidelity(),
    ]


def pipeline_from_names(names: list[str], config: OptimizeConfig = OptimizeConfig()) -> list[Pass]:
    """Passes by registered name (built-in or from the ``graphprune.passes`` entry points), each
    built from ``config`` (:meth:`Pass.from_config`)."""
    registry = available_passes()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise GraphpruneError(f"unknown pass '{shown(unknown[0])}'; available: {', '.join(sorted(registry))}",
                              parameter="passes")
    return [registry[name].from_config(config) for name in names]


def optimize(model: Model, tiny: TinySet, config: OptimizeConfig = OptimizeConfig(),
             pipeline: list[Pass] | None = None) -> OptimizeResult:
    """Run ``pipeline`` (default: :func:`default_pipeline`) on ``model`` with the tiny set: drop
    blocks until the measured latency cut reaches ``config.latency_cut``, then recover."""
    image_input_shape(model)
    if config.lever == "auto" and pipeline is not None:
        raise GraphpruneError("lever 'auto' chooses between the two default pipelines; a pipeline of its own "
                              "takes lever 'blocks' or 'resolution'", parameter="lever")
    ctx = make_context(model, tiny, config)
    lever = {"chosen": config.lever, "reason": "as asked", "candidates": {}}
    if config.lever == "auto":
        state, lever = optimize_auto(model, ctx, config, default_pipeline)
    else:
        steps = default_pipeline(config) if pipeline is None else pipeline
        state = PassState(model)
        Pipeline(steps).run(model, ctx, state)
    report = build_report(model, state, ctx, config)
    report["lever"] = lever
    if config.lever == "blocks" and (report.get("held_out") or {}).get("warning"):
        # a model blocks broke that runs smaller: lever "auto" tries both and keeps the closer (nudenet's
        # YOLOv8n at 10%: blocks kept 17 of 296 detections on 800 photos, the resolution it kept 228)
        try:
            report["lever"]["resolution_applies"] = runs_smaller(model)
        except Exception:  # noqa: BLE001 - a hint must not cost the run its written model
            log.debug("resolution_applies not known", exc_info=True)
    return OptimizeResult(state.model, state, report)


def make_context(model: Model, tiny: TinySet, config: OptimizeConfig) -> PassContext:
    """What the passes share, from ``config``: the backend, the target and the tiny set's split."""
    train, holdout = split_holdout(tiny, config.holdout_fraction, config.holdout_minimum, config.seed)
    return PassContext(original=model, tiny=tiny, train=train, holdout=holdout, backend=get_backend(config.backend),
                       latency=config.latency, latency_cut=config.latency_cut, margin=config.margin,
                       feature_node=config.feature_node, cache_dir=config.cache_dir,
                       show_progress=config.show_progress, config=config,
                       deadline=None if config.time_budget_s is None else time.monotonic() + config.time_budget_s)


def build_report(original: Model, state: PassState, ctx: PassContext, config: OptimizeConfig) -> dict:
    """The JSON report, from the artefacts the steps left (a step a user removed leaves its part
    empty): per-block scores, the choice, latency, settings and time per stage."""
    found = state.artifacts
    selection, final = found.get(Selection), found.get(FinalCut)
    table, pooled = found.get(BlockLatencyTable), found.get(PooledLatency)
    recoverabilities, refinement, recovery = found.get(BlockRecoverabilities), found.get(Refinement), found.get(RecoveryLog)
    latency = {row.name: row for row in table.rows if row.name not in table.unmeasured} if table else {}
    pooled_saved = pooled.saved_fractions() if pooled else {}
    scores = {s.name: s for s in selection.scores} if selection else {}
    recoverability = {r.name: r for r in recoverabilities or []}
    dropped = selection.blocks if selection else []
    blocks = []
    for block in found.get(Blocks) or []:
        row, score, rec = latency.get(block.name), scores.get(block.name), recoverability.get(block.name)
        blocks.append({
            "name": block.name, "kind": block.kind, "macs": block.macs, "params": block.params,
            "recoverability": rec.recoverability if rec else None,
            "recoverability_relative": rec.relative if rec else None,
            "saved_ms": row.saved_ms if row else None, "saved_fraction": row.saved_fraction if row else None,
            "saved_fraction_pooled": pooled_saved.get(block.name),
            "score": score.to_dict()["score"] if score else None,
            "dropped": block.name in dropped,
        })
    measured = {name: row.saved_fraction for name, row in latency.items()}
    return {
        "model": original.name,
        "dropped": dropped,
        "latency": {"original_ms": final.original.median_ms, "optimized_ms": final.candidate.median_ms,
                    "cut": final.cut, "target": config.latency_cut,
                    "selection_cut": selection.cut.cut if selection else None,
                    "original_stats": final.original.to_dict(),
                    "optimized_stats": final.candidate.to_dict(), "given_file": final.given_file} if final else None,
        "blocks": blocks,
        "identical_blocks": [{"blocks": names, "measured": [measured.get(n) for n in names],
                              "pooled": pooled_saved.get(names[0])} for names in (pooled.pooled_groups if pooled else [])],
        "selection_measurements": selection.measurements if selection else [],
        "refinement": refinement.record if refinement else None,
        "mimic_targets": describe_targets(original, config.feature_node),
        "data": {**ctx.tiny.summary(), "train_for_scoring": len(ctx.train), "held_out_for_scoring": len(ctx.holdout),
                 "train_for_recovery": len(ctx.tiny)},
        "recovery": ({"loss_curve": recovery.loss_curve, "final_loss": recovery.final_loss,
                      "seconds": recovery.seconds, "kept_step": recovery.kept_step,
                      "stopped_at": recovery.stopped_at, "diverged": recovery.diverged,
                      "guard_signal": recovery.guard_signal} if recovery else None),
        "settings": {**config.to_dict(), "backend_info": table.backend_info if table else None},
        "seconds_per_stage": dict(state.timings),
        "scoring_steps": _scoring_steps(recoverabilities, config),
        # add_layers' record: the layers outside the blocks, whether they joined the candidates and why
        "layers_outside_blocks": state.records.get("add_layers"),
        "resumed_from_cache": {"latency_rows": table.from_cache if table else 0,
                               "recoverability": recoverabilities.from_cache if recoverabilities else 0},
        "held_out": found.get(HeldOutFidelity).to_dict() if found.get(HeldOutFidelity) else None,
        "resolution": found.get(ResolutionChoice).to_dict() if found.get(ResolutionChoice) else None,
        "quantization": quantization_report(config, found.get(QuantizationPlan), found.get(QuantizedOnnx), final,
                                            no_block_needed(ctx, found)),
        "pipeline": list(state.records),
        # the steps whose work is in the written file: none, and the output is the input as it was
        "changed_by": state.changed_by + (["int8"] if written_int8(found) is not None else []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _scoring_steps(recoverabilities, config: OptimizeConfig) -> dict | None:
    """The adaptor steps per block scoring used where the time budget made them fewer than asked."""
    if recoverabilities is None or recoverabilities.settings.iterations == config.recoverability.iterations:
        return None
    return {"asked": config.recoverability.iterations, "used": recoverabilities.settings.iterations}


def written_int8(found):
    """The int8 ONNX a ``quantize_result`` step made among the artefacts ``found`` (what
    :func:`write_result` writes instead of the float model), or None."""
    quantized = found.get(QuantizedOnnx)
    return quantized.proto if quantized is not None else None


def quantization_report(config: OptimizeConfig, plan, quantized, final, block_work_skipped: str | None = None
                        ) -> dict | None:
    """The plan (candidates, choice, reason, its cut alone), the nodes left in float, why no block was
    profiled or scored where quantisation alone reached the goal, and the final cut split into
    block dropping's share (the recovered float model against the original, timed in the same
    interleaved run) and quantisation's; None for a float-only pipeline."""
    if plan is None and quantized is None:
        return None
    written = quantized is not None and quantized.proto is not None
    split = None
    if final is not None:
        float_cut = final.float_cut
        split = {"float_only": float_cut, "quantization": final.cut - float_cut if written else 0.0, "total": final.cut}
    return {"mode": config.quantize, "used": written,
            "reason": quantized.reason if quantized is not None else plan.reason,
            "plan": plan.to_dict() if plan is not None else None,
            "float_nodes": quantized.float_nodes if written else None,
            "against_float_on_tiny_set": quantized.agreement if written else None,
            "mimic": quantized.info.get("mimic") if written else None,
            "block_work_skipped": block_work_skipped,
            "cut": split}


def evaluate_result(result: OptimizeResult, original: Model, test: TinySet) -> dict:
    """The report's ``eval``: the original and what ``optimize`` made, on ``test``. Where a
    ``quantize_result`` step made an int8 file, ``optimized`` is that file as onnxruntime runs it (what
    :func:`write_result` writes) and ``optimized_float`` the float model before quantisation."""
    from .evaluate import evaluate, evaluate_written

    int8 = written_int8(result.state.artifacts)
    evaluation = {"original": evaluate(original, test),
                  "optimized": evaluate_written(result.model, int8, test, original)}
    if int8 is not None:
        evaluation["optimized_float"] = evaluate(result.model, test, original)
    return evaluation


def write_result(result: OptimizeResult, path, source_path=None) -> Path:
    """Write what ``optimize`` made: the quantised ONNX file where a ``quantize_result`` step made
    one (ONNX even where ``path`` or the input is ``.pt2``: ``report["output_note"]`` says so),
    else the model as :func:`~graphprune.formats.save` writes it. Atomic; returns the path written."""
    int8 = written_int8(result.state.artifacts)
    if int8 is None:
        save(result.model, path, source_path)
        result.report["output"] = str(path)
        return Path(path)
    path, note = Path(path), None
    if path.suffix.lower() == ".pt2":
        path, note = path.with_suffix(".onnx"), f"the int8 model is ONNX: written to {path.with_suffix('.onnx').name}"
    elif result.model.source != "onnx":
        note = f"the int8 model is ONNX, whatever the input's format ({result.model.source})"
    if path.suffix.lower() != ".onnx":
        raise GraphpruneError(f"output must end in .onnx or .pt2, got '{path.name}'", parameter="output")
    if not path.parent.is_dir():
        raise GraphpruneError(f"output folder does not exist: {path.parent}", parameter="output")
    sources = [source_path, result.model.onnx.path if result.model.onnx is not None else None]
    if path.exists() and any(s is not None and Path(s).exists() and Path(s).resolve() == path.resolve() for s in sources):
        raise GraphpruneError(f"refusing to overwrite the input model {path}; choose another output path",
                              parameter="output")
    data = int8.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    result.report["output"] = str(path)
    if note:
        result.report["output_note"] = note
    return path
