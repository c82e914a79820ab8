"""Latency backends: one file per runtime (:mod:`.onnxruntime`, :mod:`.torch_eager`); the
interface and the shared timing code are in :mod:`.base`."""

from .base import (LatencyBackend, LatencySettings, LatencyStats, compare_interleaved, get_backend, latency_cut,
                   time_runs)

__all__ = ["LatencyBackend", "LatencySettings", "LatencyStats", "compare_interleaved", "get_backend",
           "latency_cut", "time_runs"]
