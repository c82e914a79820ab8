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
SIGTERM (``timeout``, a CI cancel, ``kill``) is handled the same way: by default Python dies at
once, skipping every ``finally``, and left int8 quantisation's temporary folder (tens of MB) behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_requested = threading.Event()
_previous_unraisablehook = sys.unraisablehook
_signal = [signal.SIGINT]  # the last interrupting signal: the exit status is 128 + its number


def _handler(signum, frame) -> None:
    _signal[0] = signum
    _requested.set()
    raise KeyboardInterrupt


def _unraisablehook(unraisable) -> None:
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _requested.is_set():
        return  # remembered: raised again at the next check, not printed
    _previous_unraisablehook(unraisable)


def quiet_while_starting() -> None:
    """When the process is the ``graphprune`` command, end it with the one line a later Ctrl-C
    (or SIGTERM) gives if it arrives before :func:`install` runs: importing torch takes seconds, and
    the default handler printed a traceback of the import. Nothing exists yet that needs cleaning up.
    A library import (any other program) keeps Python's handler."""
    orig_argv = getattr(sys, "orig_argv", [])
    command = (os.path.basename(sys.argv[0]) if sys.argv else "") == "graphprune" or any(
        flag == "-m" and module == "graphprune" for flag, module in zip(orig_argv, orig_argv[1:]))
    if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _end_while_starting)
        signal.signal(signal.SIGTERM, _end_while_starting)  # silent by default, but the same line later says it


def _end_while_starting(signum, frame) -> None:
    word, status = _ending(signum)
    sys.stderr.write(f"graphprune: {word}\n")
    sys.stderr.flush()
    os._exit(status)


def install() -> None:
    """Make SIGINT remembered as well as raised, and a swallowed one silent (main thread only; call
    once, from the CLI)."""
    global _previous_unraisablehook
    _requested.clear()
    _signal[0] = signal.SIGINT
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)  # what timeout, CI and kill send: Python's default ends at once
    if sys.unraisablehook is not _unraisablehook:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisablehook


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived since :func:`install`, even if it was swallowed."""
    if _requested.is_set():
        raise KeyboardInterrupt


def interrupted_by() -> tuple[str, int]:
    """How the CLI ends after an interrupt: ``("interrupted", 130)`` for Ctrl-C, ``("terminated",
    143)`` for SIGTERM (128 + the signal's number, as a shell reports it)."""
    return _ending(_signal[0])


def _ending(signum: int) -> tuple[str, int]:
    return ("terminated" if signum == signal.SIGTERM else "interrupted"), 128 + int(signum)
