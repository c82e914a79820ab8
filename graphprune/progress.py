"""Progress bars on stderr (tqdm), silent when stderr is not a terminal or when disabled.

Every ``update`` is also a point where a remembered Ctrl-C is raised (``interrupts.py``): the long
loops (scoring, recovery, synthesis) all report progress through here."""

from __future__ import annotations

import sys

from .interrupts import raise_if_interrupted


class _Silent:
    def update(self, n: int = 1) -> None:
        raise_if_interrupted()

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool = True):
    """A tqdm bar, or a silent stand-in with the same three methods."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm

    class _Bar(tqdm):
        def update(self, n: int = 1):
            raise_if_interrupted()
            return super().update(n)

    return _Bar(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
