"""Adaptors around a dropped block (PRACTISE): where they go and how they are fitted.

* :func:`shape_region`: the run of consecutive blocks with the dropped block's output shape (one
  stage of a ResNet, a ViT's encoder); :func:`adaptor_sites`: the (producer, readers) edges of the
  original graph that get an adaptor when a block of it goes (the rule is in
  :mod:`.recoverability`'s docstring); :func:`current_input` and :func:`redirect` find and re-point
  those edges in the pruned graph.
* :func:`fit_adaptors`: only the adaptors trained to the targets (the network frozen, eval mode),
  the held-out error of the best checkpoint returned (the identity start included: a fit never
  scores worse than no fit); :func:`ridge_map`: the closed-form adaptor of the ``lstsq`` estimator.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import fx

from ..adaptors import adaptor_parameters
from ..checkpoints import BestCheckpoint, checkpoint_steps
from ..features import image_count, image_rows, mimic_loss
from ..ops import tensor_args
from ..precision import autocast, memory_format, to_format
from .find_blocks import Block, node_named

if TYPE_CHECKING:
    from .recoverability import RecoverabilitySettings


def shape_region(blocks: list[Block], block: Block) -> list[Block]:
    """The run of consecutive residual blocks (each one's entry is the previous one's exit) around
    ``block`` whose outputs have ``block``'s shape: one stage of a ResNet, the encoder of a ViT. A
    layer unit is a region of its own, and ends a run of blocks (it has no branch to adapt)."""
    index = blocks.index(block)
    if block.kind == "layer":
        return [block]  # one adaptor where it was (adaptor_sites)

    def joins(other: Block, entry: str, exit_: str) -> bool:
        return other.kind != "layer" and other.output_shape == block.output_shape and entry == exit_

    lo = hi = index
    while lo > 0 and joins(blocks[lo - 1], blocks[lo].entry, blocks[lo - 1].exit):
        lo -= 1
    while hi + 1 < len(blocks) and joins(blocks[hi + 1], blocks[hi + 1].entry, blocks[hi].exit):
        hi += 1
    return blocks[lo:hi + 1]


def adaptor_sites(gm: fx.GraphModule, blocks: list[Block], region: list[Block],
                  dropped: Block) -> list[tuple[str, list[str]]]:
    """(producer, readers) edges of the original graph that get an adaptor when ``dropped`` goes
    (see the module docstring); a layer unit's: where it was, for all its readers."""
    if dropped.kind == "layer":
        return [(dropped.exit, [u.name for u in node_named(gm, dropped.exit).users])]
    sites: list[tuple[str, list[str]]] = []
    position = region.index(dropped)
    for before in region[:position]:
        sites.append((before.branch_output, [before.merge]))
        if before.kind == "projection":
            sites.append((before.shortcut_output, [before.merge]))
    after = list(region[position + 1:])
    following = blocks.index(region[-1]) + 1
    if following < len(blocks) and blocks[following].entry == region[-1].exit:
        after.append(blocks[following])
    for later in after:
        entry_readers = {u.name for u in node_named(gm, later.entry).users}
        paths = [later.branch] + ([later.shortcut] if later.kind == "projection" else [])
        for path in paths:
            readers = [name for name in path if name in entry_readers]
            if readers:
                sites.append((later.entry, readers))
    if not any(producer == dropped.exit for producer, _ in sites):
        # no block of the region reads the gap (an MBConv stage's last block before a downsampling
        # one, a ViT's last MLP before the final norm): one adaptor where the block's output was
        sites.append((dropped.exit, [u.name for u in node_named(gm, dropped.exit).users]))
    return sites


def current_input(original: fx.GraphModule, gm: fx.GraphModule, producer: str, consumer: str) -> fx.Node:
    """The node that now feeds ``consumer`` where ``producer`` did (it may have been replaced)."""
    slot = _slots(node_named(original, consumer), node_named(original, producer))[0]
    return tensor_args(node_named(gm, consumer))[slot]


def _slots(node: fx.Node, value: fx.Node) -> list[int]:
    return [i for i, arg in enumerate(tensor_args(node)) if arg is value]


def redirect(original: fx.GraphModule, reader: fx.Node, producer: str, new: fx.Node) -> None:
    """Make ``reader`` read ``new`` in the argument slots where, in ``original``, it read
    ``producer`` (and in no other slot, even one holding the same value)."""
    slots = set(_slots(node_named(original, reader.name), node_named(original, producer)))
    counter = iter(range(len(tensor_args(reader))))

    def swap(arg: fx.Node) -> fx.Node:
        return new if next(counter) in slots else arg
    reader.args = fx.node.map_arg(reader.args, swap)
    reader.kwargs = fx.node.map_arg(reader.kwargs, swap)


def ridge_map(x: torch.Tensor, y: torch.Tensor, dim: int, ridge: float) -> torch.Tensor:
    """A minimising sum ||A x_p - y_p||^2 + lam ||A - I||^2 over positions p (channels on ``dim``)."""
    xs = x.movedim(dim, -1).reshape(-1, x.shape[dim]).double()
    ys = y.movedim(dim, -1).reshape(-1, y.shape[dim]).double()
    gram = xs.T @ xs
    lam = ridge * float(gram.trace()) / gram.shape[0] + 1e-12
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    a_t = torch.linalg.solve(gram + lam * eye, xs.T @ ys + lam * eye)
    return a_t.T.float()


def fit_adaptors(student: fx.GraphModule, inputs: tuple[torch.Tensor, ...], targets: tuple, weights: list[float],
                  settings: "RecoverabilitySettings", holdout_error, step_seconds: list | None = None) -> float:
    """Fit ``student``'s adaptors to ``targets`` and return the held-out error ``holdout_error()``
    of the best of the checkpoints: the identity start and every fifth of the steps. So the fit
    never leaves the held-out error above no fit at all: with few training images the adaptors can
    fit them and not the rest (early stopping on the held-out error). ``step_seconds``: the steps' own seconds are
    appended to it (:mod:`.scoring_budget` sizes the steps from them)."""
    params = adaptor_parameters(student)
    if not params or settings.iterations <= 0:
        return holdout_error()
    guard = BestCheckpoint(params, holdout_error)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    student.eval()
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=settings.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    milestone = max(1, int(0.4 * settings.iterations))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], gamma=0.1)
    gen = torch.Generator().manual_seed(settings.seed)
    n = image_count((*inputs, *targets))  # a cached value may fold the batch (MobileViT's patches)
    checkpoints = checkpoint_steps(settings.iterations)
    fmt = memory_format(settings.precision, settings.device, student)
    started = time.perf_counter()
    for step in range(settings.iterations):
        index = torch.randint(0, n, (min(settings.batch_size, n),), generator=gen)
        with autocast(settings.precision, settings.device):
            output = student(*(to_format(image_rows(x, n, index), fmt) for x in inputs))
        loss = mimic_loss([o.float() for o in output], [image_rows(t, n, index) for t in targets], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step + 1 in checkpoints:
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - started)
            guard.check(step + 1)
            started = time.perf_counter()
    for p in params:
        p.requires_grad_(False)
    return guard.restore()
