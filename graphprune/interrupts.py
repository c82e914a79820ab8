"""Ctrl-C that cannot be lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be.
When that is inside a finaliser (``__del__``, a weakref callback: the garbage collector runs them
at arbitrary points, and fx, onnx and onnxruntime objects have them), Python prints "Exception
ignored" and carries on, so a Ctrl-C could end in a finished run and exit status 0. The CLI
therefore installs :func:`install`, whose handler also *remembers* the interrupt; long loops
(progress bars), pipeline steps and every atomic write call :func:`raise_if_interrupted`, so a
swallowed interrupt is raised again at the next of those points and no output file appears.
Python also prints a swallowed interrupt, "Exception ignored in ..." and a traceback, on stderr;
after :func:`install` the unraisable hook drops those (they are remembered, and the CLI ends with
one line), so a Ctrl-C never shows a traceback. Every other unraisable exception is reported as
before. Library use without :func:`install` keeps Python's default behaviour (the flag is never set).
"""

from __future__ import annotations

import signal
import sys
import threading

_requested = threading.Event()
_previous_unraisablehook = sys.unraisablehook


def _handler(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


def _unraisablehook(unraisable) -> None:
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _requested.is_set():
        return  # remembered: raised again at the next check, not printed
    _previous_unraisablehook(unraisable)


def install() -> None:
    """Make SIGINT remembered as well as raised, and a swallowed one silent (main thread only; call
    once, from the CLI)."""
    global _previous_unraisablehook
    _requested.clear()
    signal.signal(signal.SIGINT, _handler)
    if sys.unraisablehook is not _unraisablehook:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisablehook


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived since :func:`install`, even if it was swallowed."""
    if _requested.is_set():
        raise KeyboardInterrupt
