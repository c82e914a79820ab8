"""Mixed precision for the training graphprune does on the tiny set (recovery, adaptor fits).

``precision="bfloat16"`` runs the forward passes of teacher and student under bf16 autocast
(matmuls and convolutions in bf16, accumulation and reductions in float32) and the loss in
float32; the weights and the optimiser state stay float32, so the written model is the same kind
of model. ``"auto"`` chooses bf16 only where the hardware computes it natively (x86 CPUs with
AVX512-BF16 or AMX, CUDA devices that report bf16 support), where it is faster; elsewhere bf16 is
emulated and slower, so float32 stays. ``channels_last`` goes with bf16 on the CPU: oneDNN's bf16
convolutions want NHWC.

Latency is never measured in bf16: this only changes how fast and how exactly the tiny set trains.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .errors import GraphpruneError

PRECISIONS = ("auto", "float32", "bfloat16")
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def check_precision(precision: str, parameter: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise GraphpruneError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})", parameter=parameter)


def check_device(device: str, parameter: str = "device") -> None:
    """A torch device graphprune can train on here (cpu, cuda, cuda:N), or one line saying why not."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise GraphpruneError(f"unknown {parameter} '{device}' (cpu, cuda or cuda:N)", parameter=parameter)
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise GraphpruneError(f"{parameter} '{device}' is not here: this machine has {found} CUDA GPU(s)",
                              parameter=parameter)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """x86 flags AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); False where it cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(_NATIVE_BF16_FLAGS & set(flags))


def resolve_precision(precision: str, device: str) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``precision`` means on ``device``."""
    check_precision(precision)
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if kind == "cpu" and cpu_has_native_bf16() else "float32"


def autocast(precision: str, device: str):
    """The context the forward passes run in: bf16 autocast, or nothing."""
    if resolve_precision(precision, device) != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def memory_format(precision: str, device: str, *modules: torch.nn.Module) -> torch.memory_format | None:
    """Put ``modules``' 4-d weights and buffers in channels-last on a CPU training in bf16 (oneDNN's
    fast layout); return the format inputs should take, or None to leave them as they are. Only the
    4-d ones: ``Module.to(memory_format=...)`` also converts 5-d tensors, which channels-last cannot
    hold (a YOLOv5 head's anchor grid (1, 3, 1, 1, 2), a Conv3d's weights), and raised."""
    if resolve_precision(precision, device) != "bfloat16" or torch.device(device).type != "cpu":
        return None
    for module in modules:
        if module is not None:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.dim() == 4:
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return torch.channels_last


def to_format(x: torch.Tensor, fmt: torch.memory_format | None) -> torch.Tensor:
    return x.contiguous(memory_format=fmt) if fmt is not None and x.dim() == 4 else x
