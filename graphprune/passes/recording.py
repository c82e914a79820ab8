"""The original network's values at named nodes, recorded in one pass per set of images.

Scoring starts each block from values the original network computes before it (its entry, or its
shape region's entry with the earlier values the rest reads: ``features.cut_before``). Recording
every value the blocks to score will start from in one pass of the original, instead of one pass
up to each, makes scoring a block without adaptors a pass of the network after the block alone
(MaxViT-T at 224 px, 16 held-out images: 1-2.5 s a block instead of 4.3 s).

Invariants: a value is the original's at that node on all of a split's images, batch first (as
``features.truncate`` returns it), whichever pass recorded it. One pass keeps at most
``RECORD_MEMORY_SHARE`` of the memory available (the values planned first, then the rest when
needed); a value planned for some keys is freed once every one of them is ``done``.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import fx

from ..features import run_batched, truncate
from ..memory import available_memory
from ..ops import is_multi_output
from .find_blocks import node_named

# one recording pass keeps at most this share of the memory available (the rest is recorded when
# needed): ResNet-50's 16 block inputs at 224 px are 4.4 GB for 200 held-out images
RECORD_MEMORY_SHARE = 0.25


class Recording:
    """Values of ``gm`` (the original network) at named nodes on each split of ``images``;
    ``shapes`` (node -> shape for one image) sizes them."""

    def __init__(self, gm: fx.GraphModule, images: dict[str, torch.Tensor], shapes: dict[str, tuple]):
        self.gm, self.images, self.shapes = gm, images, shapes
        self.recorded: dict[str, dict[str, torch.Tensor]] = {split: {} for split in images}
        self.planned: dict[str, dict[str, None]] = {split: {} for split in images}  # ordered sets
        self.uses: dict[str, Counter] = {split: Counter() for split in images}  # keys not done that name each
        self.named_by: dict[str, dict[str, list[str]]] = {}  # key -> split -> the values planned for it

    def plan(self, key: str, names: dict[str, list[str]]) -> None:
        """``key`` (a block) will read the values ``names`` lists per split: record them with the
        first pass that split runs. Planned again, only what is new counts."""
        mine = self.named_by.setdefault(key, {})
        for split, wanted in names.items():
            new = [n for n in dict.fromkeys(wanted) if n not in mine.get(split, ())]
            mine[split] = [*mine.get(split, ()), *new]
            self.planned[split].update(dict.fromkeys(new))
            self.uses[split].update(new)

    def done(self, key: str) -> None:
        """``key`` has read what it planned: free the values no key left names."""
        for split, names in self.named_by.pop(key, {}).items():
            self.uses[split].subtract(names)
            for name in names:
                if self.uses[split][name] <= 0:
                    self.recorded[split].pop(name, None)
                    self.planned[split].pop(name, None)

    def record(self, split: str, cut: list[str] = ()) -> None:
        """Record the values at ``cut`` and at the planned nodes not yet recorded on ``split``'s
        images (in the order planned, while their bytes stay within ``RECORD_MEMORY_SHARE`` of the
        memory available), in one pass."""
        recorded = self.recorded[split]
        wanted = [n for n in dict.fromkeys([*cut, *self.planned[split]]) if n not in recorded
                  and not is_multi_output(node_named(self.gm, n))]
        available = available_memory()
        room = None if available is None else RECORD_MEMORY_SHARE * available
        names = []
        for name in wanted:
            size = math.prod(self.shapes.get(name) or ()) * 4 * len(self.images[split])  # float32
            if name in cut or room is None or size <= room:
                names.append(name)
                room = None if room is None else room - size
        if names:
            values = run_batched(truncate(self.gm, names), self.images[split])
            recorded.update(zip(names, values if isinstance(values, tuple) else (values,)))

    def values(self, split: str, cut: list[str]) -> tuple[torch.Tensor, ...]:
        """The values at the nodes ``cut`` names on ``split``'s images."""
        if not set(cut) <= set(self.recorded[split]):
            self.record(split, cut)
        return tuple(self.recorded[split][name] for name in cut)
