"""A small on-disk cache so long runs resume: block scores, latency rows, synthetic data.

Entries live in ``<cache_dir>/<kind>-<key>.json`` where ``key`` hashes everything the result
depends on (model graph and weights, data, settings). Each ``set`` rewrites the file atomically,
so a run killed at any moment leaves either the old or the new content, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import GraphpruneError
from .model import Model


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphprune"


def model_fingerprint(model: Model) -> str:
    """Hash of the graph's code and every weight's bytes."""
    h = hashlib.sha256(model.graph_module.code.encode())
    for name, tensor in sorted(model.graph_module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def settings_fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_folder(directory: str | Path) -> Path:
    """``directory``, created where it is missing; one line where it cannot be (a file, no rights)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphpruneError(f"cannot create cache folder {directory}: {exc.strerror}") from None
    return directory


class JsonCache:
    """A persistent ``str -> JSON value`` mapping (``None`` directory: in memory only)."""

    def __init__(self, directory: str | Path | None, kind: str, key: str):
        self.path = None if directory is None else Path(directory) / f"{kind}-{key}.json"
        self.data: dict = {}
        if self.path is not None:
            cache_folder(self.path.parent)
            if self.path.exists():
                try:
                    self.data = json.loads(self.path.read_text())
                except (ValueError, OSError):
                    self.data = {}  # a damaged cache is recomputed, never trusted

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        if self.path is not None:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
