"""Analysis: how well the network recovers from losing each block (PRACTISE's recoverability).

For block ``b``: drop it, insert identity-initialised linear adaptors around the gap, fit only the
adaptors so the pruned network's features match the original's on the training split, and report
the remaining feature MSE on the *held-out* split (never the images the adaptors were fitted on):

    R(b) = mean over held-out x of L(f_pruned+adaptors(x), f_original(x))

``f`` the mimicked targets and ``L`` their scale-weighted MSE (:mod:`graphprune.features`; for a
classifier, the feature MSE).

Estimators (``estimator=``):

* ``"practise"``: the paper's adaptors, placed within the dropped block's shape region (same
  output shape, consecutive blocks): on the branch outputs (and projection outputs) of the blocks
  before the gap, on the branch inputs of the blocks after it, and on the branch and projection
  inputs of the first block after the region; where none of those reads the gap (a block followed
  by a plain layer, as an MBConv stage's last residual block before a downsampling one), one
  adaptor on the gap itself, on what its readers now read. Trained with Adam (or the paper's SGD with momentum
  0.9; either with step decay x0.1 at 40% of the steps) on the features, network frozen in eval
  mode. The frozen prefix before the region is computed once per image and cached, so each step
  runs only the region and what follows (where the rest of the network also reads earlier values,
  a neck's shortcut from before the region, those are cached with it: ``features.cut_before``).
  The score is the held-out error of the best checkpoint (the identity start and every fifth of
  the steps): a fit never scores worse than no fit, where the adaptors fit the few training
  images and not the rest.
  The original network's values at every block's start are recorded in one pass per split
  (:mod:`.recording`), so the error without adaptors (``before_fit``; at 0 steps, a time
  budget's floor, the score) runs only the network after the block: MaxViT-T at 224 px, 16
  held-out images, 1-2.5 s a block instead of 4.3 s.
* ``"lstsq"``: one adaptor at the gap, solved in closed form so that it maps the value arriving at
  the gap to the original block's output (ridge least squares over every position of every
  training image), then the held-out feature MSE as above. Costs one partial forward pass.
* ``"none"``: no adaptor: the feature MSE of the network without the block.
* ``"influence"``: not PRACTISE but ShortGPT's Block Influence, ``1 - cos(block input, block
  output)`` averaged over positions of the training images; kept as a baseline criterion.

Where the adaptors go and how they are fitted is :mod:`.adaptor_fit`.

Why more than one: on a 2-core CPU the paper's 1000+ SGD steps per block make scoring ResNet-56
take hours. The benchmark ``benchmarks/studies/scoring_study.py`` measures how well each estimator (and
each iteration count) reproduces the ranking of blocks by accuracy after full recovery.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx

from ..adaptors import Adaptor, channel_dim, insert_adaptor
from ..cache import tensor_fingerprint
from ..data import TinySet
from ..errors import GraphpruneError
from ..features import (cached_suffix, cut_before, mimic_loss, mimic_targets, run_batched, target_names, target_weights,
                        truncate)
from ..graph_stats import node_stats
from ..model import Model
from ..ops import is_multi_output
from ..precision import check_precision
from ..progress import progress_bar
from .base import Analysis, PassResult
from .drop_blocks import drop_blocks
from .find_blocks import Block, Blocks, blocks_of, node_named
from .plan_quantization import no_block_needed
from .recording import Recording
from .quantize_plan import QuantizationPlan
from .adaptor_fit import adaptor_sites, current_input, fit_adaptors, redirect, ridge_map, shape_region
from .scoring_budget import SCORE_SHARE, affordable_iterations

log = logging.getLogger("graphprune")
ESTIMATORS = ("practise", "lstsq", "none", "influence")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class RecoverabilitySettings:
    # Defaults from benchmarks/studies/scoring_study.py (ResNet-56, 500 images, 27 blocks): 50 adaptor
    # steps per block take 3-5 minutes for all blocks on a 2-core CPU; with Adam at lr 3e-3 they
    # rank the blocks like 1000 SGD steps do at Spearman 0.96 (the paper's SGD at lr 0.02: 0.93;
    # 200 SGD steps: 0.98; Adam at lr 1e-2: 0.85; lstsq: 0.88; Block Influence: 0.86). Fifty SGD
    # steps under-rate the blocks of the first stage, whose adaptors converge slowest.
    estimator: str = "practise"
    iterations: int = 50
    optimizer: str = "adam"  # "adam", or "sgd" (the paper's: lr 0.02, momentum 0.9, weight decay 1e-4)
    lr: float = 0.003
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ridge: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    # the adaptor fits' forward passes: "bfloat16" autocast, or "auto" where the hardware has bf16
    # (precision.py); held-out errors, the scores, are always computed in float32
    precision: str = "float32"


@dataclass(frozen=True)
class BlockRecoverability:
    name: str
    recoverability: float  # held-out feature MSE after fitting the adaptors
    relative: float  # the same, divided by the mean squared teacher feature
    before_fit: float  # held-out feature MSE with identity adaptors (the block simply gone)
    seconds: float | None = None  # what scoring it took (None: read from an older cache)

    def to_dict(self) -> dict:
        return asdict(self)


class BlockRecoverabilities(list):
    """Artefact: every candidate block's :class:`BlockRecoverability`, and the estimator settings
    that measured them (a refinement's joint fits use the same estimator)."""

    def __init__(self, scores=(), settings: RecoverabilitySettings = RecoverabilitySettings(), from_cache: int = 0):
        super().__init__(scores)
        self.settings, self.from_cache = settings, from_cache

    def seconds_per_block(self) -> float | None:
        """Mean seconds one block's scoring took (cached ones included where the cache recorded
        it), or None where none says."""
        timed = [s.seconds for s in self if s.seconds is not None]
        return sum(timed) / len(timed) if timed else None


def data_key(ctx) -> str:
    """What recoverability depends on besides the model and the estimator: the split images."""
    return tensor_fingerprint(ctx.train.images, ctx.holdout.images)


class Recoverability(Analysis):
    """Score every candidate block's recoverability on ``ctx.train``/``ctx.holdout`` (see the module
    docstring), none where a ``QuantizationPlan``'s quantisation alone reaches the goal
    (:func:`~.plan_quantization.no_block_needed`); block scores resume from ``ctx.cache``."""

    name = "score_recoverability"
    config_field = "recoverability"
    optional = (Blocks, QuantizationPlan)
    provides = (BlockRecoverabilities,)

    def __init__(self, settings: RecoverabilitySettings = RecoverabilitySettings()):
        self.settings = settings

    def run(self, model: Model, ctx, inputs) -> PassResult:
        skipped = no_block_needed(ctx, inputs)
        if skipped:
            record = {"settings": asdict(self.settings), "blocks": [], "from_cache": 0, "skipped": skipped}
            return PassResult(model, record=record, artifacts=[BlockRecoverabilities([], self.settings)])
        blocks = blocks_of(model, inputs)
        train, holdout = ctx.need("train", self.name), ctx.need("holdout", self.name)
        cache = ctx.cache("recoverability", data_key(ctx), asdict(self.settings), ctx.feature_node)
        cached = sum(1 for b in blocks if b.name in cache)
        budget = ctx.stage_budget(None, share=SCORE_SHARE)
        scores = score_blocks(model, blocks, train, holdout, self.settings, ctx.feature_node,
                              ctx.show_progress, cache, max_seconds=budget)
        record = {"settings": asdict(scores.settings), "blocks": [s.to_dict() for s in scores],
                  "from_cache": cached if scores.settings == self.settings else 0}
        if scores.settings != self.settings:
            record["time_limit"] = {"seconds": budget, "iterations_asked": self.settings.iterations,
                                    "iterations": scores.settings.iterations}
        return PassResult(model, record=record,
                          artifacts=[BlockRecoverabilities(scores, scores.settings, record["from_cache"])])


def score_blocks(model: Model, blocks: list[Block], train: TinySet, holdout: TinySet,
                 settings: RecoverabilitySettings, feature_node: str | None = None,
                 show_progress: bool = True, cache=None, candidates: list[str] | None = None,
                 max_seconds: float | None = None) -> BlockRecoverabilities:
    """Recoverability of each block, in the order given. ``cache`` (a dict-like of JSON records,
    e.g. :class:`graphprune.cache.JsonCache`) is read before and written after each block, so an
    interrupted run resumes where it stopped. ``candidates`` limits which blocks are scored (all
    blocks still define the shape regions adaptors are placed in). ``max_seconds``: where the
    adaptor steps asked for would not fit, every block gets the steps that do
    (:mod:`.scoring_budget`), neither read from nor written to ``cache`` (kept for the steps asked);
    the result's ``settings`` are those used."""
    if settings.estimator not in ESTIMATORS:
        raise GraphpruneError(f"unknown recoverability estimator '{settings.estimator}' ({', '.join(ESTIMATORS)})")
    if settings.optimizer not in OPTIMIZERS:
        raise GraphpruneError(f"unknown adaptor optimizer '{settings.optimizer}' ({', '.join(OPTIMIZERS)})")
    check_precision(settings.precision, "recoverability.precision")
    targets = mimic_targets(model, feature_node)
    context = None  # built on first use: a fully cached run computes nothing
    results = []
    todo = [b for b in blocks if candidates is None or b.name in candidates]
    uncached = [b for b in todo if cache is None or b.name not in cache]
    if max_seconds is not None and settings.estimator == "practise" and uncached:
        started = time.perf_counter()
        context = _Context(model, blocks, train, holdout, targets, settings)
        context.plan(uncached, ("holdout",))
        context.recording.record("holdout")  # once for every block: not a cost of the probed blocks'
        steps = affordable_iterations(settings.iterations, len(todo), max_seconds - (time.perf_counter() - started),
                                      [functools.partial(_probe, context, block)
                                       for block in dict.fromkeys((uncached[0], uncached[-1]))])
        if steps < settings.iterations:
            log.info("scoring: %d adaptor steps per block instead of %d, to fit %.0f s of the time budget",
                     steps, settings.iterations, max_seconds)
            settings, cache = replace(settings, iterations=steps), None  # the cache's records are for the steps asked
            context.settings = settings
    if context is not None and _fits_adaptors(settings):
        context.plan(uncached, ("train", "holdout"))
    bar = progress_bar(total=len(todo), desc=f"recoverability ({settings.estimator})", enabled=show_progress)
    for block in todo:
        cached = cache.get(block.name) if cache is not None else None
        if cached is None:
            started = time.perf_counter()
            if context is None:
                context = _Context(model, blocks, train, holdout, targets, settings)
                context.plan(uncached, ("train", "holdout") if _fits_adaptors(settings) else ("holdout",))
            result = replace(context.score(block), seconds=round(time.perf_counter() - started, 2))
            context.recording.done(block.name)  # its recorded values go where no block left reads them
            if cache is not None:
                cache[block.name] = result.to_dict()
        else:
            result = BlockRecoverability(**cached)
        results.append(result)
        bar.update(1)
    bar.close()
    return BlockRecoverabilities(results, settings)


def _fits_adaptors(settings: RecoverabilitySettings) -> bool:
    """Whether scoring fits adaptors on the training images (the PRACTISE estimator, steps > 0)."""
    return settings.estimator == "practise" and settings.iterations > 0


def _probe(context: "_Context", block: Block, steps: int) -> tuple[float, float]:
    """Seconds scoring ``block`` with ``steps`` adaptor steps takes, and its steps' own seconds."""
    asked = context.settings
    context.settings, context.step_seconds = replace(asked, iterations=steps), []
    started = time.perf_counter()
    try:
        context.score(block)
    finally:
        context.settings = asked
    return time.perf_counter() - started, sum(context.step_seconds)


def set_scorer(model: Model, blocks: list[Block], train: TinySet, holdout: TinySet,
               settings: RecoverabilitySettings, feature_node: str | None = None):
    """A function ``names -> joint recoverability`` of dropping those blocks together (estimator
    ``practise``); teacher features and prefix activations are computed once, on first use."""
    targets = mimic_targets(model, feature_node)
    context = []

    def score(names: list[str]) -> float:
        if not context:
            context.append(_Context(model, blocks, train, holdout, targets, settings))
        return context[0].score_set(names)
    return score


class _Context:
    """What every block's scoring shares: teacher features, shapes, cached prefix activations."""

    def __init__(self, model, blocks, train, holdout, targets, settings):
        device = torch.device(settings.device)
        if device.type != "cpu":
            model = model.clone()
            model.graph_module.to(device)
        self.model, self.blocks, self.settings = model, blocks, settings
        self.train_x, self.holdout_x = train.images.to(device), holdout.images.to(device)
        self.targets = targets
        teacher = truncate(model.graph_module, target_names(model.graph_module, targets))
        self.teacher_train = run_batched(teacher, self.train_x)
        self.teacher_holdout = run_batched(teacher, self.holdout_x)
        self.weights = target_weights(self.teacher_train)
        # the loss's mean(s): relative = loss / scale is the mean over targets of MSE_t / s_t
        self.scale = sum(float(t.pow(2).mean()) or 1.0 for t in self.teacher_holdout) / len(targets)
        self.shapes = {b.exit: b.output_shape for b in blocks}
        self.shapes.update({name: s.shape for name, s in node_stats(self._on_cpu(model)).items()})
        self.images = {"train": self.train_x, "holdout": self.holdout_x}
        # the original's values where scoring starts, one pass per split for every planned block (plan)
        self.recording = Recording(model.graph_module, self.images, self.shapes)
        self.step_seconds: list[float] = []  # adaptor steps' own seconds (scoring_budget.py reads them)

    @staticmethod
    def _on_cpu(model: Model) -> Model:
        if all(p.device.type == "cpu" for p in model.graph_module.parameters()):
            return model
        cpu = model.clone()
        cpu.graph_module.to("cpu")
        return cpu

    def score(self, block: Block) -> BlockRecoverability:
        if self.settings.estimator == "influence":
            influence = self._influence(block)
            return BlockRecoverability(block.name, influence, influence, influence)
        dropped = drop_blocks(self.model, [block.name], self.blocks)
        gm = dropped.graph_module
        before = self._holdout_mse(*self._from_cache(gm, block.entry, splits=("holdout",)))
        estimator = self.settings.estimator
        if estimator == "none" or (estimator == "practise" and self.settings.iterations <= 0):
            after = before  # no step: the adaptors stay the identity (a time budget's 0 steps, scoring_budget.py)
        elif estimator == "lstsq":  # closed form: no steps, whatever iterations says
            after = self._lstsq(block, gm)
        else:
            after = self._practise([block], gm)
        return BlockRecoverability(block.name, after, after / self.scale, before)

    def _student(self, gm: fx.GraphModule) -> fx.GraphModule:
        """``gm`` (pruned, adaptors in) up to the targets, as a tuple."""
        return truncate(gm, target_names(gm, self.targets))

    def _holdout_mse(self, student: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> float:
        return float(mimic_loss(run_batched(student, inputs), self.teacher_holdout, self.weights))

    # --- block influence (ShortGPT) -------------------------------------------------------------
    def _influence(self, block: Block) -> float:
        original = self.model.graph_module
        y, = self.recording.values("train", [block.exit])
        # the block's input, or, where the entry is a tuple (a Split) or the block changes the
        # shape, the value its shortcut adds to the branch
        x = None if is_multi_output(node_named(original, block.entry)) else \
            self.recording.values("train", [block.entry])[0]
        if x is None or x.shape != y.shape:
            x, = self.recording.values("train", [block.shortcut_output])
        dim = channel_dim(node_named(original, block.exit), original, tuple(y.shape))
        cos = F.cosine_similarity(x.movedim(dim, -1).reshape(-1, x.shape[dim]),
                                  y.movedim(dim, -1).reshape(-1, y.shape[dim]), dim=-1)
        return float(1 - cos.mean())

    # --- closed form --------------------------------------------------------------------------
    def _lstsq(self, block: Block, gm: fx.GraphModule) -> float:
        self._insert_gap_adaptor(block, gm)
        gm.recompile()
        return self._holdout_mse(self._student(gm), (self.holdout_x,))

    def _insert_gap_adaptor(self, block: Block, gm: fx.GraphModule) -> None:
        """An adaptor where the block was, solved in closed form to map what now arrives there to
        what the block used to output (over every position of every training image)."""
        original = self.model.graph_module
        readers = [u.name for u in node_named(original, block.exit).users]
        nodes = {n.name: n for n in gm.graph.nodes}
        gap_readers = [nodes[r] for r in readers if r in nodes]
        if not gap_readers:
            return
        gap_value = current_input(original, gm, block.exit, gap_readers[0].name)
        shape = self.shapes[block.exit]
        dim = channel_dim(node_named(original, block.exit), original, shape)
        x = run_batched(truncate(gm, gap_value.name), self.train_x)
        y = run_batched(truncate(original, block.exit), self.train_x)
        weight = ridge_map(x, y, dim, self.settings.ridge)
        node = insert_adaptor(gm, gap_value, [], shape[dim], dim, "gap_adaptor")
        for reader in gap_readers:
            redirect(original, reader, block.exit, node)
        gm.get_submodule(str(node.target)).weight.data.copy_(weight)

    # --- PRACTISE adaptors --------------------------------------------------------------------
    def score_set(self, names: list[str]) -> float:
        """Joint recoverability: drop every block of ``names`` at once, fit adaptors around all the
        gaps together, return the held-out feature MSE (``refine_selection.py``)."""
        dropped = [b for b in self.blocks if b.name in set(names)]
        if not dropped:
            return 0.0  # nothing dropped: the features are the original's
        return self._practise(dropped, drop_blocks(self.model, [b.name for b in dropped], self.blocks).graph_module)

    def _practise(self, dropped: list[Block], gm: fx.GraphModule) -> float:
        """``dropped`` in graph order: the union of each dropped block's adaptor sites."""
        original = self.model.graph_module
        sites: list[tuple[str, list[str]]] = []
        for block in dropped:
            sites += [s for s in adaptor_sites(original, self.blocks, shape_region(self.blocks, block), block)
                      if s not in sites]
        nodes = {n.name: n for n in gm.graph.nodes}
        for k, (producer, consumers) in enumerate(sites):
            readers = [nodes[c] for c in consumers if c in nodes]
            if not readers or is_multi_output(node_named(original, producer)):
                continue  # nothing reads it any more, or a tuple: its parts get adaptors where read
            value = current_input(original, gm, producer, readers[0].name)
            shape = self.shapes[producer]
            dim = channel_dim(node_named(original, producer), original, shape)
            adaptor = insert_adaptor(gm, value, [], shape[dim], dim, f"adaptor_{k}")
            for reader in readers:
                redirect(original, reader, producer, adaptor)
        gm.recompile()
        start = shape_region(self.blocks, dropped[0])[0].entry  # every adaptor sits after it
        student, train_in, holdout_in = self._from_cache(gm, start)
        return fit_adaptors(student, train_in, self.teacher_train, self.weights, self.settings,
                             lambda: self._holdout_mse(student, holdout_in), self.step_seconds)

    def plan(self, blocks: list[Block], splits: tuple[str, ...]) -> None:
        """Name the values that scoring ``blocks`` starts from on ``splits`` (each block's entry,
        for its error without adaptors; its shape region's entry too, on ``train`` and
        ``holdout``, where adaptors are fitted; Block Influence: its input, output and shortcut),
        so that one pass of the original per split records them (:mod:`.recording`)."""
        original = self.model.graph_module
        for block in blocks:
            if self.settings.estimator == "influence":
                self.recording.plan(block.name, {"train": [block.entry, block.exit, block.shortcut_output]})
                continue
            region = [shape_region(self.blocks, block)[0].entry] if "train" in splits else []
            starts = {"train": region, "holdout": [block.entry, *region]}
            names = {split: [n for start in starts[split] for n in cut_before(original, start) or []]
                     for split in splits}
            self.recording.plan(block.name, names)

    def _from_cache(self, gm: fx.GraphModule, start: str, splits: tuple[str, ...] = ("train", "holdout")):
        """``gm``'s targets as a function of recorded values before node ``start`` (unchanged by
        dropping later blocks), and those values for each of ``splits``: ``start``'s
        alone where the rest of the graph reads nothing earlier, else ``start``'s and the earlier
        values it reads too (``features.cached_suffix``: a neck's Concat with features from
        before the gap; PP-OCRv4's recogniser ran every adaptor step from the image without it);
        the whole network from the images where neither can be cut (a Split at ``start``)."""
        shapes = [x.shape for x in self.model.example_inputs()]
        found = cached_suffix(gm, start, target_names(gm, self.targets), shapes)
        original = {n.name for n in self.model.graph_module.graph.nodes}  # the recording runs the original
        if found is None or not set(found[0]) <= original:
            return self._student(gm), *((self.images[split],) for split in splits)
        cut, student = found
        return student, *(self.recording.values(split, list(cut)) for split in splits)


__all__ = ["Adaptor", "BlockRecoverability", "ESTIMATORS", "Recoverability", "RecoverabilitySettings",
           "adaptor_sites", "score_blocks", "set_scorer", "shape_region"]
