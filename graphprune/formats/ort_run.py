"""Run an ONNX file on onnxruntime's CPU provider, as graphprune's calibration, judging and
evaluation do: a session that refuses in one line, feeds in the file's own input layout and float
type (:func:`ort_feeds`), whole batches where the file fixes one."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GraphpruneError, first_line
from .batch_axis import batch_first
from .input_layout import TO_FILE_LAYOUT, looks_channels_last


def image_batches(session, images: torch.Tensor, batch_size: int, equal: bool = False):
    """Feeds for ``session``, ``batch_size`` images at a time (the input's fixed batch where it has
    one), in the file's own input layout and float type (:func:`ort_feeds`).
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


def run_outputs(session, images: torch.Tensor, batch_size: int, axes: tuple[int, ...] = ()) -> np.ndarray:
    """The first output of ``session`` on ``images``, batched (:func:`run_all_outputs`)."""
    return run_all_outputs(session, images, batch_size, axes, first_only=True)[0]


def run_all_outputs(session, images: torch.Tensor, batch_size: int, axes: tuple[int, ...] = (),
                    first_only: bool = False) -> list[np.ndarray]:
    """Every output of ``session`` on ``images`` (``first_only``: the first alone; the others are
    not kept), batched, each batch first (``axes``: where the model's outputs hold their batch,
    ``batch_axis.output_batch_axes``; () where all on axis 0)."""
    kept = 1 if first_only else None
    batches = [batch_first(session.run(None, feeds), axes)[:kept]
               for feeds in image_batches(session, images, batch_size)]
    return [np.concatenate(parts) for parts in zip(*batches)]


def run_onnxruntime(proto_or_bytes, inputs: tuple[torch.Tensor, ...],
                    channels_last: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort

    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is raised and said in one line; no log of it
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, ort_feeds(session, inputs, channels_last))


_ORT_FLOATS = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}
_ORT_INTEGERS = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def ort_feeds(session, inputs: tuple[torch.Tensor, ...], channels_last: bool = False) -> dict[str, np.ndarray]:
    """Feeds for an onnxruntime session in the file's own form: each float tensor in the type the
    file declares (a half-precision file is computed in float32 by graphprune, see
    :func:`~.io_onnx._compute_in_float32`; for a uint8 input, rounded and clipped to its range) and, for a
    ``channels_last`` model, in (N, H, W, C) layout (:mod:`graphprune.formats.input_layout`)."""
    feeds = {}
    for info, tensor in zip(session.get_inputs(), inputs):
        if channels_last and tensor.dim() == 4:
            tensor = tensor.permute(*TO_FILE_LAYOUT)
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        wanted = _ORT_FLOATS.get(info.type) or _ORT_INTEGERS.get(info.type)
        if wanted is not None and np.issubdtype(array.dtype, np.floating) and array.dtype != wanted:
            if np.issubdtype(wanted, np.integer):  # pixels for a uint8 input: rounded, as a camera gives them
                bounds = np.iinfo(wanted)
                array = np.clip(np.rint(array), bounds.min, bounds.max)
            array = array.astype(wanted)
        feeds[info.name] = array
    return feeds
