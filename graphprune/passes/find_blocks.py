"""Analysis: find every residual block, in any architecture, from the dataflow graph alone.

Definition. Let G be the dataflow graph of the fx nodes that depend on input values (constants and
shape arithmetic removed, see :func:`graphprune.ops.constant_nodes`), with a virtual root feeding
every input. A *merge* is an add of two such tensors. For a merge ``m`` with operands ``a`` and
``b``, the *entry* is ``idom(m)``, its immediate dominator, and the region R is every node on a
path from the entry to ``m``. ``m`` is a residual block when

1. R is single-entry single-exit: nodes of R other than the entry read only from R, and nodes of R
   other than ``m`` are read only by R (so dropping the block removes all of it);
2. R splits into two disjoint paths, one ending in ``a`` and one in ``b``;
3. one path, the *shortcut*, is empty (``identity``), parameter-free and short (``shortcut``:
   strided slicing, pooling, channel padding) or one weighted op plus norms (``projection``),
   and the other, the *branch*, contains at least one weighted op (conv, linear, matmul);
4. the branch does not hold every weighted op of the network: a global residual, y = x + f(x)
   around the whole network (a denoiser such as DnCNN, a super-resolution net adding its
   upsampled input), is how the network states its output, and dropping it would leave none;
5. a projection's branch computes something other than a linear map (convs, norms, average
   pools and sums only): conv(x) + conv'(x), the training form of RepVGG and MobileOne (branches summed that
   become one conv once reparameterised), is one layer, not a block around one. Their identity
   branch, x + convs(x), is a block.

A *channel-split residual* (ShuffleNetV2's unit: ``cat(x1, f(x2))`` where ``x1, x2`` split ``x``)
is a block of kind ``split``: its merge is a concat of two tensors, its region is single-entry
single-exit as in 1., one side (the pass-through) is parameter-free slicing of the entry and the
other, the branch, carries the weights and keeps its input piece's shape, and the concat computes
the entry exactly when the branch is replaced by the identity on its piece (checked on the values
of one forward pass, whatever ops do the slicing). Dropping it makes the concat's readers read the
entry.

A network with neither kind of block (VGG, PP-LCNet) gets its *layer units* instead, kind ``layer``
(:mod:`.layer_units`): a residual network keeps exactly its blocks, and with ``layers`` gets the
units that share no node with any block besides them (:func:`outside_layers`, which
:mod:`.add_layers` offers where the blocks cannot reach the target).

An activation that is the merge's only reader belongs to the block. Blocks are named after the
module path shared by the merge and the branch's weighted ops (``layer2.1``, ``features.3``);
where two blocks would share a name (two residuals in one transformer layer) the branch's own path
is used (``encoder.layers.encoder_layer_4.mlp``); where the graph carries no paths, the merge
node's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import networkx as nx
import torch
from torch import fx

from ..errors import GraphpruneError
from ..graph_stats import count_params, model_macs, node_stats, node_values, run_node_with
from ..model import Model
from ..ops import (ACTIVATIONS, NO_OPS, ancestors, constant_nodes, is_binary_add, is_multi_output, is_weighted,
                   op_kind, tensor_args)
from ..scopes import common_prefix, node_scope
from .base import Analysis, PassResult
from .layer_units import layer_units

MAX_SHORTCUT_NODES = 8  # longer parameter-free paths are computations, not shortcuts
# Kinds of a branch that is a linear map of the entry (rule 5): reparameterisable parallel convs.
_LINEAR_KINDS = frozenset({"conv", "linear", "batch_norm", "add", "pad", "avg_pool"}) | NO_OPS
_ROOT = "__root__"


@dataclass(frozen=True)
class Block:
    """A residual block, by fx node names. ``exit`` is the merge or its post-merge activation."""

    name: str
    kind: str  # "identity" | "shortcut" | "projection" | "split" | "layer"
    entry: str
    merge: str
    exit: str
    branch: tuple[str, ...]
    shortcut: tuple[str, ...]
    branch_output: str
    shortcut_output: str  # the value the merge becomes when the block goes (a split block: the entry)
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    params: int = 0
    macs: int = 0
    branch_input: str | None = None  # a split block's: the piece of the entry its branch transforms

    def summary(self) -> dict:
        """The JSON record used by ``inspect --json`` and reports."""
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k])
                for k in ("name", "kind", "input_shape", "output_shape", "params", "macs")}


class Blocks(list):
    """Artefact: the residual blocks of the model the pipeline started from (a list of :class:`Block`)."""


class FindBlocks(Analysis):
    """Find the residual blocks of a model (see the module docstring for the definition)."""

    name = "find_blocks"
    provides = (Blocks,)

    def run(self, model: Model, ctx=None, inputs=None) -> PassResult:
        blocks = find_blocks(model)
        total_macs = model_macs(model) if blocks else 0
        record = {"count": len(blocks), "model_macs": total_macs,
                  "blocks": [b.summary() for b in blocks]}
        return PassResult(model, changed=False, record=record, artifacts=[Blocks(blocks)])


def find_blocks(model: Model, require: bool = False, layers: bool = False) -> list[Block]:
    """The residual blocks of ``model`` in graph order. With ``require``, none is an error. With
    ``layers``, also the layer units that lie wholly outside every block (a detector's plain
    backbone beside its residual neck; :func:`outside_layers` says which those are)."""
    gm = model.graph_module
    constants = constant_nodes(gm)
    graph = _dataflow_graph(gm, constants)
    idom = nx.immediate_dominators(graph, _ROOT)
    stats = node_stats(model)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    weighted = {n for n in graph if n is not _ROOT and is_weighted(n, gm, constants)}
    added, concatenated = [], []
    for node in gm.graph.nodes:
        if node not in graph:
            continue
        if is_binary_add(node, gm) and not ({*node.args} & constants) and node.args[0] is not node.args[1]:
            added.append(_match_block(node, *node.args, graph, idom, gm, constants, order))
        elif op_kind(node, gm) == "cat":
            concatenated.append(_match_split(node, graph, idom, gm, constants, order))
    splits = _exact_splits(model, [r for r in concatenated if r is not None])
    raw = [r for r in added + splits if r is not None and not weighted <= set(r.branch)]  # no global residual (4.)
    units = []
    if not raw or layers:  # a plain network's (or a plain part's) stride-1, channel-keeping layers
        shapes = {name: s.shape for name, s in stats.items()}
        units = [_Raw(exit_node, entry, exit_node, "layer", nodes[:-1], [], exit_node, entry)
                 for entry, nodes, exit_node in layer_units(gm, graph, constants, shapes, _ROOT, order)]
    if not raw:
        raw, units = units, []
    blocks = _name_blocks(raw, gm, constants, stats)
    taken = {b.name for b in blocks}
    for unit in _name_blocks(_outside(units, raw), gm, constants, stats):
        name, k = unit.name, 1
        while name in taken:  # a block keeps its name; the layer beside it gives way
            name, k = f"{unit.name}#{k}", k + 1
        blocks.append(replace(unit, name=name))
        taken.add(name)
    blocks.sort(key=lambda blk: order[node_named(gm, blk.merge)])
    if require and not blocks:
        raise GraphpruneError(f"no residual blocks found in {model.name}, nor a layer that keeps its shape: "
                              "nothing to drop")
    return blocks


def outside_layers(model: Model, blocks: list[Block]) -> list[Block]:
    """The layer units of ``model`` that share no node with any of its residual ``blocks`` (their
    entries aside), named so that no block's name changes; none where ``blocks`` holds layer units
    itself (a plain network's candidates are its layers already)."""
    if not blocks or any(b.kind == "layer" for b in blocks):
        return []
    return split_layers(find_blocks(model, layers=True))[1]


def split_layers(found: list[Block]) -> tuple[list[Block], list[Block]]:
    """``find_blocks(model, layers=True)`` as (its blocks, the layers outside them): a network with
    no residual block has its layers as its blocks and none outside."""
    if all(b.kind == "layer" for b in found):
        return found, []
    return [b for b in found if b.kind != "layer"], [b for b in found if b.kind == "layer"]


def _outside(units: list["_Raw"], raw: list["_Raw"]) -> list["_Raw"]:
    """The units none of whose nodes belongs to a block of ``raw`` (its entry excepted: a layer may
    read a block's output, and a block a layer's)."""
    covered = {n for r in raw for n in (*r.branch, *r.shortcut, r.merge, r.exit)}
    return [u for u in units if covered.isdisjoint((*u.branch, u.merge))]


def blocks_of(model: Model, inputs) -> list[Block]:
    """The blocks a pipeline step found (``Blocks``), an empty list included: a model with none may
    still reach its target by int8 alone, and check_reachable says so where it cannot; without that
    artefact (a pass run on its own) they are found now, and none is an error."""
    found = inputs.get(Blocks) if inputs is not None else None
    return find_blocks(model, require=True) if found is None else found


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called ``name`` (a KeyError where there is none)."""
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def _dataflow_graph(gm: fx.GraphModule, constants: set[fx.Node]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node(_ROOT)
    live = ancestors(gm.graph.output_node())  # tracing leaves unused values: x, _ = attention(...)
    for node in gm.graph.nodes:
        if node in constants or node not in live:
            continue
        graph.add_node(node)
        if node.op == "placeholder":
            graph.add_edge(_ROOT, node)
        for inp in node.all_input_nodes:
            if inp not in constants and inp in live:
                graph.add_edge(inp, node)
    return graph


@dataclass
class _Raw:
    merge: fx.Node
    entry: fx.Node
    exit: fx.Node
    kind: str
    branch: list[fx.Node]
    shortcut: list[fx.Node]
    branch_output: fx.Node
    shortcut_output: fx.Node
    branch_input: fx.Node | None = None


def _sese_region(entry, merge, graph) -> set | None:
    """Every node on a path from ``entry`` to ``merge``, where that region is single-entry
    single-exit (rule 1), else None."""
    region = (nx.descendants(graph, entry) & nx.ancestors(graph, merge)) | {entry, merge}
    for node in region:
        if node is not entry and any(p not in region for p in graph.predecessors(node)):
            return None
        if node is not entry and node is not merge and any(s not in region for s in graph.successors(node)):
            return None
    return region


def _match_block(merge, a, b, graph, idom, gm, constants, order) -> _Raw | None:
    entry = idom.get(merge)
    if entry is None or entry == _ROOT:
        return None
    region = _sese_region(entry, merge, graph)
    if region is None:
        return None
    side_a = _side(a, entry, region, graph)
    side_b = _side(b, entry, region, graph)
    if side_a & side_b or (side_a | side_b | {entry, merge}) != region:
        return None
    sides = []
    for operand, side in ((a, side_a), (b, side_b)):
        weighted = [n for n in side if is_weighted(n, gm, constants)]
        real = [n for n in side if op_kind(n, gm) not in NO_OPS]
        sides.append((operand, side, weighted, real))
    shortcut_like = [s for s in sides if _is_shortcut(s, gm, constants)]
    if not shortcut_like:
        return None
    # Prefer the simpler side as the shortcut: fewer weighted ops, then fewer real ops.
    shortcut = min(shortcut_like, key=lambda s: (len(s[2]), len(s[3])))
    branch = sides[1] if shortcut is sides[0] else sides[0]
    if not branch[2]:
        return None  # the branch must carry weights
    kind = "projection" if shortcut[2] else ("shortcut" if shortcut[3] else "identity")
    if kind == "projection" and all(op_kind(n, gm) in _LINEAR_KINDS for n in branch[1]):
        return None  # rule 5: parallel linear branches summed, one conv once reparameterised
    return _Raw(merge, entry, _exit(merge, gm, constants), kind,
                sorted(branch[1], key=order.get), sorted(shortcut[1], key=order.get), branch[0], shortcut[0])


def _exit(merge, gm, constants):
    """The merge, or its post-merge activation where that is its only reader."""
    users = list(merge.users)
    if len(users) == 1 and op_kind(users[0], gm) in ACTIVATIONS and \
            [i for i in users[0].all_input_nodes if i not in constants] == [merge]:
        return users[0]
    return merge


def _match_split(merge, graph, idom, gm, constants, order) -> _Raw | None:
    """A channel-split residual by structure (module docstring); :func:`_exact_splits` checks its
    values. The entry is the value split; a multi-output splitter (``torch.chunk``) between them
    belongs to the pass-through side."""
    operands = [a for a in tensor_args(merge) if a not in constants]
    if len(operands) != 2 or operands[0] is operands[1]:
        return None
    entry, splitter = idom.get(merge), None
    if entry is not None and entry != _ROOT and is_multi_output(entry):
        inputs = [i for i in entry.all_input_nodes if i not in constants]
        entry, splitter = (inputs[0], entry) if len(inputs) == 1 else (None, None)
    if entry is None or entry == _ROOT:
        return None
    region = _sese_region(entry, merge, graph)
    if region is None:
        return None
    sides = [_side(operand, entry, region, graph) - {splitter} for operand in operands]
    if sides[0] & sides[1] or sides[0] | sides[1] | {entry, merge, splitter} != region | {splitter}:
        return None
    weighted = [[n for n in side if is_weighted(n, gm, constants)] for side in sides]
    if bool(weighted[0]) == bool(weighted[1]):
        return None  # one side passes its piece through, the other carries the weights
    through, branch = (0, 1) if weighted[1] else (1, 0)
    if len(sides[through]) > MAX_SHORTCUT_NODES:
        return None
    starts = [n for n in sides[branch] if {i for i in n.all_input_nodes if i not in constants} <= {entry, splitter}]
    if len(starts) != 1 or starts[0] is operands[branch]:
        return None
    passing = sorted(sides[through] | ({splitter} if splitter is not None else set()), key=order.get)
    return _Raw(merge, entry, _exit(merge, gm, constants), "split", sorted(sides[branch], key=order.get), passing,
                operands[branch], entry, branch_input=starts[0])


def _exact_splits(model: Model, candidates: list[_Raw]) -> list[_Raw]:
    """The candidates whose concat gives back the entry, on one forward pass's values, when the
    branch's output is replaced by its input piece."""
    if not candidates:
        return []
    wanted = {n for r in candidates for n in (r.entry, r.branch_input, *tensor_args(r.merge))}
    values = node_values(model, wanted)
    exact = []
    for r in candidates:
        swapped = [values.get(r.branch_input) if a is r.branch_output else values.get(a) for a in tensor_args(r.merge)]
        if any(not isinstance(values.get(n), torch.Tensor) for n in (r.entry, r.branch_input, r.branch_output)) or \
                values[r.branch_output].shape != values[r.branch_input].shape:
            continue
        out = run_node_with(model.graph_module, r.merge, swapped)
        if isinstance(out, torch.Tensor) and out.shape == values[r.entry].shape and torch.equal(out, values[r.entry]):
            exact.append(r)
    return exact


def _side(operand, entry, region, graph) -> set:
    if operand is entry:
        return set()
    return ((nx.ancestors(graph, operand) & region) - {entry}) | {operand}


def _is_shortcut(side, gm, constants) -> bool:
    _, nodes, weighted, real = side
    if len(weighted) > 1 or len(real) > MAX_SHORTCUT_NODES:
        return False
    if weighted:
        # a projection: one weighted op; the rest norms or parameter-free reshaping
        return all(n in weighted or not is_weighted(n, gm, constants) for n in nodes)
    return True


def _name_blocks(raw: list[_Raw], gm, constants, stats) -> list[Block]:
    names = _block_names(raw, gm, constants)
    blocks = []
    for r, name in zip(raw, names):
        region = [r.entry, *r.branch, *r.shortcut, r.merge] + ([r.exit] if r.exit is not r.merge else [])
        body = region[1:]
        with_constants = set(body)
        for node in body:
            with_constants |= {c for c in _constant_ancestors(node, constants)}
        blocks.append(Block(
            name=name, kind=r.kind, entry=r.entry.name, merge=r.merge.name, exit=r.exit.name,
            branch=tuple(n.name for n in r.branch), shortcut=tuple(n.name for n in r.shortcut),
            branch_output=r.branch_output.name, shortcut_output=r.shortcut_output.name,
            input_shape=stats[r.entry.name].shape if r.entry.name in stats else None,
            output_shape=stats[r.exit.name].shape if r.exit.name in stats else None,
            params=count_params(with_constants, gm),
            macs=sum(stats[n.name].macs for n in with_constants if n.name in stats),
            branch_input=r.branch_input.name if r.branch_input is not None else None,
        ))
    return blocks


def _block_names(raw: list[_Raw], gm, constants) -> list[str]:
    """Name each block after the module that computes its merge (``layer2.1``); where several
    blocks share that module (two residuals per transformer layer), append the child module most
    of the branch's weighted ops live in (``...encoder_layer_4.mlp``). Majority voting keeps names
    stable when a simplifier has renamed a few nodes."""
    weighted = [[node_scope(n) for n in r.branch if is_weighted(n, gm, constants)] for r in raw]
    bases = []
    for r, scopes in zip(raw, weighted):
        anchor = [*r.branch, r.merge][0] if r.kind == "layer" else r.merge  # a layer: its weighted op
        base = node_scope(anchor) or common_prefix([s for s in scopes if s])
        bases.append(base or anchor.meta.get("onnx_name", anchor.name))
    names = []
    for r, base, scopes in zip(raw, bases, weighted):
        if "block_name" in r.merge.meta:  # recorded by graphprune when it exported the model
            names.append(r.merge.meta["block_name"])
            continue
        if bases.count(base) == 1:
            names.append(base)
            continue
        children = [s[len(base) + 1:].split(".")[0] for s in scopes if s.startswith(base + ".")]
        child = max(dict.fromkeys(children), key=children.count) if children else ""
        names.append(f"{base}.{child}" if child else base)
    counts = {name: names.count(name) for name in names}
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # last resort: disambiguate duplicates by position
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}#{seen[name]}"
    return names


def _constant_ancestors(node: fx.Node, constants: set[fx.Node]) -> set[fx.Node]:
    found, stack = set(), [i for i in node.all_input_nodes if i in constants]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.add(current)
        stack.extend(i for i in current.all_input_nodes if i in constants)
    return found
