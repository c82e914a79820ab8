"""A Ctrl-C that Python swallows (raised inside a finaliser) is still honoured: the next progress
update, pipeline step or atomic write raises it, no output file appears and no traceback is printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from graphprune import interrupts
from graphprune.formats.model_io import atomic_write
from graphprune.progress import progress_bar


class _InterruptedFinaliser:
    """Delivers SIGINT while its ``__del__`` runs: Python prints "Exception ignored" and carries on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs between these bytecodes, inside the finaliser
            pass


def _swallowed_interrupt() -> None:
    _InterruptedFinaliser()  # created and collected at once


@pytest.fixture
def installed():
    previous, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    previous_term = signal.getsignal(signal.SIGTERM)
    interrupts.install()
    yield
    interrupts._requested.clear()
    signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, previous_term)
    sys.unraisablehook = previous_hook


def test_python_swallows_an_interrupt_in_a_finaliser():
    """Why graphprune remembers interrupts: with Python's own handler the KeyboardInterrupt raised in
    the finaliser goes to the unraisable hook (which prints it with a traceback), not to the caller."""
    previous, previous_hook = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook
    swallowed = []
    sys.unraisablehook = lambda unraisable: swallowed.append(unraisable.exc_type)
    try:
        _swallowed_interrupt()  # returns normally
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
    assert swallowed == [KeyboardInterrupt]


def test_swallowed_interrupt_prints_no_traceback_and_other_unraisables_still_do(installed, capsys, monkeypatch):
    reported = []
    monkeypatch.setattr(interrupts, "_previous_unraisablehook", lambda unraisable: reported.append(unraisable.exc_type))
    _swallowed_interrupt()
    assert reported == [] and capsys.readouterr().err == ""  # remembered instead of printed
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_if_interrupted()

    class _FailingFinaliser:
        def __del__(self):
            raise ValueError("a finaliser's own error")

    _FailingFinaliser()
    assert reported == [ValueError]


def test_swallowed_interrupt_is_raised_at_the_next_progress_update(installed):
    bar = progress_bar(total=3, desc="x", enabled=False)
    bar.update()
    _swallowed_interrupt()
    with pytest.raises(KeyboardInterrupt):
        bar.update()


def test_swallowed_interrupt_leaves_no_output_file(installed, tmp_path):
    target = tmp_path / "model.onnx"

    def write(tmp):
        tmp.write_bytes(b"model")
        _swallowed_interrupt()

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


def test_without_install_nothing_is_remembered(tmp_path):
    interrupts.raise_if_interrupted()
    atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("ok"))
    assert (tmp_path / "a.txt").read_text() == "ok"


@pytest.mark.slow  # a fresh interpreter imports torch and exports a model: 6-20 s
def test_an_interrupt_once_the_output_is_written_leaves_a_whole_run(tmp_path):
    """A Ctrl-C while the interpreter shuts down after "wrote" used to kill it by the signal, with no
    message; the work was done and announced, so the command ends 0."""
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "graphprune", "export", "torchvision:resnet18", "--input-shape",
                             "1,3,32,32", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("wrote"), line
    time.sleep(0.05)  # into the interpreter's shutdown, which takes a second or so with torch loaded
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == "" and out.stat().st_size > 0


def test_sigterm_is_an_interrupt_that_says_terminated(installed):
    """Python's default SIGTERM ends the process at once, skipping every finally: int8's temporary
    folder (tens of MB) stayed behind after a timeout or a CI cancel, and nothing was said."""
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):
            pass
    assert interrupts.interrupted_by() == ("terminated", 143)
    interrupts.install()
    assert interrupts.interrupted_by() == ("interrupted", 130)


@pytest.mark.parametrize("signum,line,status", [(signal.SIGINT, "graphprune: interrupted", 130),
                                                 (signal.SIGTERM, "graphprune: terminated", 143)])
def test_a_signal_while_the_command_starts_is_one_line(signum, line, status):
    """Ctrl-C while torch was still being imported (the first seconds) printed the import's
    traceback: 12 to 52 lines and a signal's status."""
    proc = subprocess.Popen([sys.executable, "-m", "graphprune", "inspect", "zoo:cifar10_resnet20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status and err.strip().splitlines() == [line]


@pytest.mark.slow
def test_a_terminated_command_ends_in_one_line_and_leaves_no_output(tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "graphprune", "-v", "export", "torchvision:resnet50",
                             "--input-shape", "1,3,224,224", "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # past importing torch, into the export
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "graphprune: terminated" and not out.exists()
