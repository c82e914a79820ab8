"""Run an ONNX file on onnxruntime's CPU provider, as graphprune's calibration, judging and
evaluation do: a session that refuses in one line, feeds in the file's own input layout and float
type (:func:`~graphprune.formats.io_onnx.ort_feeds`), whole batches where the file fixes one."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GraphpruneError, first_line
from .input_layout import looks_channels_last
from .io_onnx import ort_feeds


def image_batches(session, images: torch.Tensor, batch_size: int, equal: bool = False):
    """Feeds for ``session``, ``batch_size`` images at a time (the input's fixed batch where it has
    one), in the file's own input layout and float type (:func:`~graphprune.formats.io_onnx.ort_feeds`).
    ``equal`` (or a fixed batch): every batch the same size, the remainder left out."""
    if len(session.get_inputs()) != 1:
        raise GraphpruneError(f"onnxruntime is fed models with one image input here; this one has "
                              f"{len(session.get_inputs())}")
    (info,) = session.get_inputs()
    fixed = fixed_batch(session)
    if fixed and len(images) < fixed:  # no whole batch to run
        raise GraphpruneError(f"the model's input fixes a batch of {fixed} images: give at least {fixed}, "
                              f"got {len(images)}, or export it with a dynamic batch")
    step = fixed or max(1, min(batch_size, len(images)))
    channels_last = looks_channels_last(tuple(info.shape))
    for start in range(0, len(images) - (len(images) % step if equal or fixed else 0), step):
        yield ort_feeds(session, (images[start:start + step],), channels_last)


def fixed_batch(session) -> int | None:
    """The batch the file's (first) input fixes, or None for a dynamic batch."""
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def cpu_session(proto_or_bytes, what: str = "the model"):
    """An onnxruntime CPU session of a ``ModelProto`` (or its bytes); one line naming ``what`` if refused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime refuses {what}: {first_line(exc)}") from None


def run_outputs(session, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """The first output of ``session`` on ``images``, batched."""
    return np.concatenate([session.run(None, feeds)[0] for feeds in image_batches(session, images, batch_size)])
