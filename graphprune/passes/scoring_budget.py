"""How many adaptor steps per block fit scoring's share of a time budget (``--time-budget``).

Scoring every block costs ``blocks x (fixed + steps x per_step)``: ``fixed`` the work a block's
score needs whatever the steps (dropping it, caching the prefix, the held-out checkpoints),
``per_step`` one adaptor step. Both are measured with ``PROBE_STEPS`` steps (the steps' own time
apart from the rest) on the first and the last block, whose mean stands for a block: a step runs
the network from the block onwards, so the first block's steps are the dearest (CIFAR ResNet-56:
the first alone put its 27 blocks at 370 s where they take 236). Where the asked steps fit the
seconds left, they stay; else every block gets the most steps that fit, the same for all so the
scores stay comparable (0: the held-out error of the block simply gone). Measured, not guessed: on nudenet's YOLOv8n a
block took 78 s with 50 steps, and six of them 466 s of a 300 s budget.
"""

from __future__ import annotations

import time
from typing import Callable

# with a --time-budget, scoring may take this share of the time left when it starts: selection,
# refinement and recovery follow, and size themselves to what is left. A guard, not a knee: CIFAR
# ResNet-56 under --time-budget 600 scored its 27 blocks at the 50 steps asked in 236 s of the 565 s
# left (benchmarks/results/optimize_resnet56_cut22_seed2021_budget600.json), which it keeps
SCORE_SHARE = 0.5
PROBE_STEPS = 5


def affordable_iterations(iterations: int, blocks: int, seconds: float,
                          probes: list[Callable[[int], tuple[float, float]]]) -> int:
    """Steps per block for ``blocks`` blocks in ``seconds`` (the probes' own time included); each
    of ``probes`` scores one block with that many steps and returns (its seconds, the seconds its
    steps took), and the mean of them stands for a block."""
    steps = min(PROBE_STEPS, iterations)
    if steps <= 0 or blocks <= 0 or not probes:
        return iterations
    started = time.perf_counter()
    measured = [probe(steps) for probe in probes]
    total, in_steps = (sum(m[i] for m in measured) / len(measured) for i in (0, 1))
    per_step, fixed = in_steps / steps, max(0.0, total - in_steps)
    left = seconds - (time.perf_counter() - started)
    if blocks * (fixed + iterations * per_step) <= left:
        return iterations
    if per_step <= 0:
        return 0
    return max(0, min(iterations, int((left / blocks - fixed) / per_step)))
