"""Early stopping on held-out images: keep the weights whose held-out error was lowest.

    best = argmin over checkpoints c in {start, c_1, ..., c_k} of E_holdout(theta_c)

The start (before any step) is a checkpoint, so training that only fits the few training images
(the tiny set is tens to hundreds of images) can never leave the held-out error above where it
began. Used by recoverability's adaptor fits and, for large images, by recovery itself, which also
stops once the last ``patience`` checkpoints have all failed to lower the best (:meth:`stalled`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class BestCheckpoint:
    """The lowest held-out error seen so far and the parameter values that gave it."""

    def __init__(self, params: Sequence[torch.Tensor], holdout_error: Callable[[], float]):
        self.params, self.holdout_error = list(params), holdout_error
        self.best = holdout_error()
        self.best_step = 0
        self._best_index = 0  # in history
        self.history: list[dict] = [{"step": 0, "holdout_error": self.best}]
        self._state = [p.detach().clone() for p in self.params]

    def check(self, step: int) -> float:
        """Measure the held-out error now; remember these weights where it is the lowest yet."""
        error = self.holdout_error()
        self.history.append({"step": step, "holdout_error": error})
        if error < self.best:
            self.best, self.best_step, self._best_index = error, step, len(self.history) - 1
            self._state = [p.detach().clone() for p in self.params]
        return error

    def stalled(self, patience: int) -> bool:
        """Whether the last ``patience`` checkpoints after the best one all failed to improve on it."""
        return len(self.history) - 1 - self._best_index >= patience

    def restore(self) -> float:
        """Put the best weights back; returns their held-out error."""
        with torch.no_grad():
            for p, value in zip(self.params, self._state):
                p.copy_(value)
        return self.best


def checkpoint_steps(total: int, count: int = 5) -> set[int]:
    """Steps (1-based) after which a checkpoint is taken: every ``total // count``-th and the last."""
    every = max(1, total // count)
    return {s for s in range(every, total + 1, every)} | {total}
