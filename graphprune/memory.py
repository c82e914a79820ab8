"""Memory: what is available, and how many images a training step may take at once.

A training step keeps every activation of its batch for the backward pass: about the bytes of every
node's output for one image, times the batch. At 224 px that is tens of MB an image and recovery's
64 fit anywhere; PaddleDetection's PicoDet at 800 x 608 makes about 1 GB an image, and int8's
quantisation-aware mimicking at its batch of 16 grew the process past 20 GB on a 24 GiB machine,
which the kernel killed (no line, no output; measured: ~1.06 GB more per image of the batch, the
estimate 1.04 GB; at the smaller batch that memory then allowed, it still grew by 10 GB over its
steps, to 20.5 GB: a tensor and its rounding are both kept, so mimicking counts two copies, and
the same run then peaked at 14.9 GB).
:func:`training_batch` gives the batch asked for, or the most images whose activations fit
``TRAINING_MEMORY_SHARE`` of the memory available when the step is sized.
"""

from __future__ import annotations

import math

TRAINING_MEMORY_SHARE = 0.5  # of MemAvailable: the teacher, the optimiser and the data hold the rest


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def image_activation_bytes(model) -> int:
    """Bytes of every float node output of ``model`` (a ``Model``) for one image at its analysis shape."""
    from .graph_stats import node_stats

    return sum(math.prod(s.shape) * s.dtype.itemsize for s in node_stats(model).values()
               if s.shape is not None and s.dtype is not None and s.dtype.is_floating_point)


def training_batch(model, wanted: int, available: int | None = None, copies: int = 1) -> int:
    """``wanted``, or fewer images (at least 1) where a step's activations, ``copies`` of each
    (quantisation-aware mimicking keeps a tensor and its rounding), would pass
    ``TRAINING_MEMORY_SHARE`` of ``available`` bytes (default: available now; unknown: ``wanted``)."""
    available = available_memory() if available is None else available
    if available is None or wanted <= 1:
        return wanted
    try:
        per_image = image_activation_bytes(model)
    except Exception:  # an estimate that cannot be made leaves the batch as asked
        return wanted
    if per_image <= 0:
        return wanted
    return max(1, min(wanted, int(TRAINING_MEMORY_SHARE * available // (copies * per_image))))
