"""What every backend needs besides its runtime: checked settings, the batch to feed, and a
description of the machine that is recorded with every measurement.

Invariant: a measurement that could silently measure the wrong thing is refused. A batch size,
thread count or device that makes no sense is a :class:`~graphprune.errors.GraphpruneError`, and
so is a model whose inputs cannot take the requested batch (an ONNX graph with a fixed batch of 1
would otherwise be timed at batch 1 while the report says 32).
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata

import torch

from ..errors import GraphpruneError
from ..model import InputSpec, Model, example_inputs
from .base import LatencySettings

DEVICES = ("cpu", "cuda")


def check_settings(settings: LatencySettings) -> None:
    """Refuse settings that cannot describe a real measurement."""
    if settings.device not in DEVICES:
        raise GraphpruneError(f"unknown device '{settings.device}': use {' or '.join(DEVICES)}")
    if settings.batch_size < 1:
        raise GraphpruneError(f"batch size must be at least 1, got {settings.batch_size}")
    if settings.threads < 1:
        raise GraphpruneError(f"threads must be at least 1, got {settings.threads}")
    if settings.min_runs < 1 or settings.max_runs < settings.min_runs:
        raise GraphpruneError(f"need 1 <= min_runs <= max_runs, got {settings.min_runs} and {settings.max_runs}")
    if settings.min_time_s < 0 or settings.warmup_s < 0 or settings.warmup_runs < 0:
        raise GraphpruneError("measurement and warm-up times and counts must not be negative")


def batch_inputs(model: Model, settings: LatencySettings) -> tuple[torch.Tensor, ...]:
    """The model's example inputs at ``settings.batch_size``; an error if the graph fixes another."""
    return spec_batch_inputs(model.inputs, model.input_shape, settings)


def spec_batch_inputs(specs: tuple[InputSpec, ...], input_shape: tuple[int, ...] | None,
                      settings: LatencySettings) -> tuple[torch.Tensor, ...]:
    """:func:`batch_inputs` for inputs described by ``specs`` (a file graphprune does not read into fx)."""
    inputs = example_inputs(specs, input_shape, settings.batch_size)
    for spec, tensor in zip(specs, inputs):
        if tensor.dim() and tensor.shape[0] != settings.batch_size:
            raise GraphpruneError(
                f"input '{spec.name}' has a fixed batch size of {tensor.shape[0]}; cannot measure batch "
                f"{settings.batch_size} (export the model with a dynamic batch axis, or use batch_size "
                f"{tensor.shape[0]})", parameter="batch_size"
            )
    return inputs


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (``"missing"`` where not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_signature() -> str:
    """Vendor, family, model and stepping from /proc/cpuinfo (``"AuthenticAMD family 26 model 2
    stepping 0"``): tells apart machines whose model name is only ``"AMD EPYC"``; ``""`` elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        return ""
    if not fields:
        return ""
    return " ".join([fields.get("vendor_id", "unknown")] +
                    [f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields])


def describe_common(backend: str, settings: LatencySettings) -> dict:
    """The fields every backend's ``describe`` shares."""
    return {"backend": backend, "device": settings.device, "threads": settings.threads,
            "batch_size": settings.batch_size, "cpu": cpu_name(),
            "cpu_signature": cpu_signature(), "python": platform.python_version()}
