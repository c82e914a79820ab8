"""Transform: drop residual blocks exactly.

Dropping a block computes what the original computes when the block's residual branch outputs
zero: the merge ``shortcut + branch`` becomes ``shortcut`` (the identity, the parameter-free
shortcut, or the projection). A channel-split block's branch becomes the identity on its piece, so
its concat becomes the entry it split; a plain network's layer unit (``layer_units.py``) becomes the
identity: its readers read its entry. Mechanically: every reader of the merge reads the shortcut's output
instead, and dead code elimination removes the branch. A post-merge activation stays unless it is
provably a no-op on the shortcut (a ReLU of a value that is already >= 0), in which case it goes
too. Nothing else in the graph changes but the merges of the blocks that stay, which keep their
names (``meta["block_name"]``, which ``find_blocks`` reads first): a transformer layer that has lost
its attention block still calls its MLP block ``...encoder_layer_1.mlp``, not ``...encoder_layer_1``.

:func:`zero_branch` builds the reference for that claim: the original graph with the branch's
output replaced by zeros.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import GraphpruneError
from ..model import Model
from ..ops import is_same_idempotent
from .base import PassResult, Transform
from .find_blocks import Block, Blocks, find_blocks
from .selection import Selection


def resolve_blocks(model: Model, names, blocks: list[Block] | None = None) -> tuple[list[Block], list[Block]]:
    """The blocks called ``names``, and all of ``model``'s (``blocks``, or found); an unknown name is
    an error that lists the available ones."""
    blocks = find_blocks(model, require=True) if blocks is None else blocks
    by_name = {b.name: b for b in blocks}
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise GraphpruneError("no block names given")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        available = ", ".join(by_name)
        raise GraphpruneError(f"unknown block '{unknown[0]}'; available: {available}")
    return [by_name[n] for n in dict.fromkeys(names)], blocks


class DropBlocks(Transform):
    """Drop the named blocks, or those of the ``Selection`` artefact (see the module docstring); an
    empty selection leaves the model as it is."""

    name = "drop_blocks"
    optional = (Blocks, Selection)

    def __init__(self, names: list[str] | None = None):
        self.names = names

    def run(self, model: Model, ctx=None, inputs=None) -> PassResult:
        selection = inputs.get(Selection) if inputs is not None else None
        names = self.names if self.names is not None else (selection.blocks if selection is not None else None)
        if names is None:
            raise GraphpruneError("drop_blocks: no blocks named and no selection to drop")
        if self.names is None and not selection.blocks:
            record = {"dropped": [], "skipped": "the selection is empty (quantisation alone reaches the target)"}
            return PassResult(model, changed=False, record=record)
        chosen, blocks = resolve_blocks(model, names, inputs.get(Blocks) if inputs is not None else None)
        new_model, removed_nodes, removed_activations = _drop(model, chosen, blocks)
        record = {"dropped": [b.name for b in chosen], "removed_nodes": removed_nodes,
                  "removed_activations": removed_activations}
        return PassResult(new_model, changed=True, record=record)


def drop_blocks(model: Model, names, blocks: list[Block] | None = None) -> Model:
    """A copy of ``model`` without the named blocks."""
    if isinstance(names, str):
        names = names.split(",")
    return _drop(model, *resolve_blocks(model, names, blocks))[0]


def _drop(model: Model, chosen: list[Block], blocks: list[Block]) -> tuple[Model, int, list[str]]:
    new = model.clone()
    gm = new.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    dropped = {b.name for b in chosen}
    for block in blocks:  # names that depended on the dropped neighbours stay (see the module docstring)
        if block.name not in dropped and block.merge in nodes:
            nodes[block.merge].meta["block_name"] = block.name
    before = len(nodes)
    replaced: dict[str, fx.Node] = {}
    for block in chosen:
        # Without a post-merge activation, a block's entry (its identity shortcut) is the previous
        # block's merge; if that merge is already gone, the shortcut is what replaced it.
        merge, shortcut = nodes[block.merge], nodes[block.shortcut_output]
        while shortcut.name in replaced:
            shortcut = replaced[shortcut.name]
        merge.replace_all_uses_with(shortcut)
        gm.graph.erase_node(merge)
        replaced[merge.name] = shortcut
    # A dropped branch's in-place ops (torch.export's relu_/hardtanh_) look impure to fx, which
    # would keep the whole branch computing; nothing outside the branch reads them.
    branch_nodes = {name for block in chosen for name in block.branch}
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.name not in branch_nodes and n.is_impure())
    removed_activations = []
    for block in chosen:
        if block.exit == block.merge or block.exit not in {n.name for n in gm.graph.nodes}:
            continue
        act = nodes[block.exit]
        inner = act.all_input_nodes[0]
        if len(act.all_input_nodes) == 1 and is_same_idempotent(act, inner, gm):
            act.replace_all_uses_with(inner)
            gm.graph.erase_node(act)
            removed_activations.append(block.exit)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return new, before - len(list(gm.graph.nodes)), removed_activations


def zero_branch(model: Model, block: Block) -> Model:
    """A copy of ``model`` in which ``block``'s residual branch outputs zeros, or for a split block
    its input piece, or a layer unit is the identity (the reference that a dropped block must equal)."""
    new = model.clone()
    gm = new.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    merge, branch_out = nodes[block.merge], nodes[block.branch_output]
    if block.kind == "layer":  # its readers read its entry: the identity in its place
        nodes[block.exit].replace_all_uses_with(nodes[block.entry])
        gm.recompile()
        return new
    if block.branch_input is not None:
        merge.replace_input_with(branch_out, nodes[block.branch_input])
        gm.recompile()
        return new
    with gm.graph.inserting_before(merge):
        zeros = gm.graph.call_function(torch.zeros_like, (branch_out,))
    merge.replace_input_with(branch_out, zeros)
    gm.recompile()
    return new

