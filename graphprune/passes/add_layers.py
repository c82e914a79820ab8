"""Analysis: where a network's residual blocks cannot reach the target, its plain layers join them.

A detector or OCR model often keeps its residual blocks in one part (a neck, a few stages) and is
plain elsewhere (PP-OCRv4's detector: a PP-LCNet backbone and 8 small residual blocks that hold
under 1% of its MACs; its 7 that save time cut 5.1% together). Its *layer units*
(:mod:`.layer_units`: a stride-1, channel-keeping layer and its weight-free tail) that lie wholly
outside every block (:func:`~.find_blocks.outside_layers`) are then candidates as well:

    mode "auto":    blocks + outside layers  where  cut(every block dropped) < goal = target + margin
                    blocks                   otherwise (one interleaved measurement decides)
    mode "always":  blocks + outside layers
    mode "never":   blocks

The measurement is the one :mod:`.check_reachable` makes of every candidate, on the backend selection
measures with (int8 where planned) and from the same resume cache. "auto" keeps every network
whose blocks suffice exactly as it was; the layers, scored like blocks (recoverability per measured
saving), are only ranked where they are needed. A network with no residual block has its layers
as candidates already.

The product's default is "never" (``OptimizeConfig.layers``), from the one real model measured:
PP-OCRv4's detector at a 15% target reached 15.1% with 5 blocks and 6 layers of its backbone (the
layers' held-out feature errors 0.51-1.01 each, the blocks' 0.005-0.06), and its probability map
lost every region (map IoU 0.000 on 800 photos; 45 recovery steps under a 900 s budget). A plain
network's layers recover (PP-LCNet's orientation classifier: 20% at no loss), a backbone's here did
not. A target the blocks cannot reach says how many layers ``--layers auto``
would add (:mod:`.check_reachable`).
"""

from __future__ import annotations

import logging

from ..errors import GraphpruneError
from ..model import Model
from .base import Analysis, PassResult
from .find_blocks import Blocks, outside_layers
from .plan_quantization import QuantizationPlan, measuring_backend, no_block_needed
from .select_blocks import run_set_measurer
from .selection import goal_cut

log = logging.getLogger("graphprune")

LAYER_MODES = ("auto", "always", "never")


def check_layers_mode(mode: str) -> None:
    if mode not in LAYER_MODES:
        raise GraphpruneError(f"layers must be one of {', '.join(LAYER_MODES)}, got '{mode}'", parameter="layers")


class AddLayers(Analysis):
    """Updates ``Blocks`` with the layer units outside the residual blocks, as ``mode`` says (see
    the module docstring); the record says why it did or did not."""

    name = "add_layers"
    requires = (Blocks,)
    optional = (QuantizationPlan,)
    provides = (Blocks,)
    config_field = "layers"

    def __init__(self, mode: str = "auto"):
        check_layers_mode(mode)
        self.mode = mode

    def run(self, model: Model, ctx, inputs) -> PassResult:
        blocks = inputs[Blocks]
        unchanged = None
        if self.mode == "never":
            unchanged = "layers 'never'"
        elif not blocks or any(b.kind == "layer" for b in blocks):
            unchanged = "no residual block: the network's layers are its candidates already"
        else:
            unchanged = no_block_needed(ctx, inputs)
        looked = not unchanged  # "never" does not look for them (None in the record)
        layers = outside_layers(model, blocks) if looked else []
        record = {"mode": self.mode, "layers_outside": len(layers) if looked else None}
        if looked and not layers:
            unchanged = "no layer outside the residual blocks keeps its shape"
        if not unchanged and self.mode == "auto":
            cut = self._every_block_dropped(model, ctx, inputs, blocks)
            goal = goal_cut(ctx.need("latency_cut", self.name), ctx.margin)
            record.update(blocks_dropped_cut=cut, goal=goal)
            if cut >= goal:
                unchanged = f"every block dropped cuts {cut:.1%}, the goal is {goal:.1%}"
        if unchanged:
            return PassResult(model, record={**record, "added": [], "reason": unchanged}, artifacts=[Blocks(blocks)])
        order = {n.name: i for i, n in enumerate(model.graph_module.graph.nodes)}
        merged = sorted([*blocks, *layers], key=lambda b: order[b.merge])
        if self.mode == "auto":
            log.info("blocks: every block dropped cuts %.1f%%, short of the %.1f%% goal; the %d layers outside "
                     "them join the candidates", 100 * record["blocks_dropped_cut"], 100 * record["goal"], len(layers))
        return PassResult(model, record={**record, "added": [b.name for b in layers]}, artifacts=[Blocks(merged)])

    def _every_block_dropped(self, model: Model, ctx, inputs, blocks) -> float:
        measure = run_set_measurer(measuring_backend(ctx, inputs, self.name), model, blocks, ctx)
        return measure([b.name for b in blocks]).cut
