"""The PyTorch eager backend: time the fx graph itself, as ``module(*inputs)`` in eval mode.

``prepare`` copies the model (:meth:`~graphprune.model.Model.clone`; the caller's model is never
moved or switched to eval), moves the copy and one fixed random batch to the device, and returns a
callable that runs one forward pass under ``torch.inference_mode()``.

Threads (CPU): ``torch.set_num_threads`` is process-wide, so the returned callable sets
``settings.threads`` for the forward pass and restores the previous value afterwards; nothing else
in the process is affected between runs. (Setting it costs well under a microsecond, so it does
not disturb the timing.)

CUDA runs asynchronously: the callable calls ``torch.cuda.synchronize()`` after the forward pass,
so the wall-clock time around it (:func:`~graphprune.backends.base.time_runs`) is the time the GPU
took, not the time to queue the kernels.
"""

from __future__ import annotations

import torch

from ..errors import GraphpruneError, first_line
from ..model import Model
from .base import LatencySettings, RunOnce
from .environment import batch_inputs, check_settings, describe_common, library_versions


class TorchEagerBackend:
    """Time models with PyTorch eager execution on the CPU or on CUDA."""

    name = "torch"

    def prepare(self, model: Model, settings: LatencySettings) -> RunOnce:
        device = self.device(settings)
        inputs = tuple(t.to(device) for t in batch_inputs(model, settings))
        module = model.clone().graph_module.eval().to(device)
        if device.type == "cuda":
            run_once = _cuda_run(module, inputs, device)
        else:
            run_once = _cpu_run(module, inputs, settings.threads)
        try:
            run_once()  # fail here, with a clear message, rather than inside a timing loop
        except Exception as exc:
            raise GraphpruneError(f"PyTorch cannot run the model at batch {settings.batch_size} on {device}: "
                                  f"{first_line(exc)}") from None
        return run_once

    @staticmethod
    def device(settings: LatencySettings) -> torch.device:
        """The torch device for ``settings.device``; an error if it is not available."""
        check_settings(settings)
        if settings.device == "cuda" and not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise GraphpruneError(f"device 'cuda' is not available to PyTorch {torch.__version__} ({built}, "
                                  "no usable GPU found); use --device cpu")
        return torch.device(settings.device)

    def describe(self, settings: LatencySettings) -> dict:
        info = describe_common(self.name, settings)
        info["versions"] = library_versions("torch", "onnx", "onnxruntime")
        if settings.device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["versions"]["cuda"] = torch.version.cuda
        return info


def _cpu_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> RunOnce:
    def run_once() -> None:
        previous = torch.get_num_threads()
        if previous != threads:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                module(*inputs)
        finally:
            if previous != threads:
                torch.set_num_threads(previous)
    return run_once


def _cuda_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device) -> RunOnce:
    def run_once() -> None:
        with torch.inference_mode():
            module(*inputs)
        torch.cuda.synchronize(device)
    return run_once
