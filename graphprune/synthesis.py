"""Synthetic tiny sets for users who may not touch any real image.

* ``procedural``: images that need nothing from the model: random shapes (rectangles, ellipses,
  strokes), textures (gratings, checkers) and noise with a natural-image power spectrum (1/f^a),
  blended. Reproducible from the seed.
* ``bn-inversion`` (DeepInversion, Yin et al. 2020): optimise a batch of images so that, at every
  BatchNorm layer, the batch's per-channel mean and variance match the layer's running statistics,

      L(x) = sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2 + a_ce CE(f(x), y) + a_tv TV(x) + a_l2 ||x||^2

  with random target classes ``y`` (the class term), a total-variation and an L2 prior, and random
  jitter and flips. Needs BatchNorm layers (PyTorch modules and ``.pt2`` programs; ONNX exports
  usually fold them away).

Both make uint8 images (N, H, W, C), so a synthetic set goes through the same preprocessing as
real images; :func:`synthetic_tiny_set` caches them on disk by (model hash, settings) so a second
run reuses them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from .errors import GraphpruneError
from .model import Model
from .ops import fetch_attr, op_kind
from .progress import progress_bar

METHODS = ("bn-inversion", "procedural")


@dataclass(frozen=True)
class SynthesisSettings:
    method: str = "auto"  # "auto": bn-inversion when the model has BatchNorm, else procedural
    num_samples: int = 256
    seed: int = 0
    steps: int = 400  # bn-inversion: optimisation steps per batch
    batch_size: int = 64
    lr: float = 0.1
    time_budget_s: float | None = None  # bn-inversion: stop early (all batches share the budget)
    class_weight: float = 0.05
    tv_weight: float = 1e-4
    l2_weight: float = 1e-5


def has_batchnorm(model: Model) -> bool:
    gm = model.graph_module
    return any(op_kind(n, gm) == "batch_norm" for n in gm.graph.nodes)


def resolve_method(model: Model, method: str) -> str:
    if method == "auto":
        return "bn-inversion" if has_batchnorm(model) else "procedural"
    if method not in METHODS:
        raise GraphpruneError(f"unknown synthesis '{method}' (bn-inversion, procedural)")
    if method == "bn-inversion" and not has_batchnorm(model):
        raise GraphpruneError("bn-inversion needs BatchNorm layers; this model has none (ONNX exports fold them)"
                              " - use --synthetic procedural")
    return method


# ------------------------------------------------------------------------------------------------
# Procedural images

def procedural_images(count: int, height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 (count, H, W, channels): blended shapes, textures and 1/f noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(1, height - 1), xx / max(1, width - 1)
    out = np.empty((count, height, width, channels), dtype=np.uint8)
    for i in range(count):
        image = _pink_noise(rng, height, width, channels) * rng.uniform(0.3, 1.0, channels) + \
            rng.uniform(0, 1, channels)
        image = image / 2
        layers = rng.integers(2, 6)
        for _ in range(layers):
            kind = rng.integers(0, 4)
            colour = rng.uniform(0, 1, channels)
            if kind == 0:  # rectangle
                y0, y1 = np.sort(rng.uniform(0, 1, 2))
                x0, x1 = np.sort(rng.uniform(0, 1, 2))
                mask = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
            elif kind == 1:  # ellipse
                cy, cx, ry, rx = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5)
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            elif kind == 2:  # grating
                angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 12)
                wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
                mask = wave > rng.uniform(-0.5, 0.5)
            else:  # stroke
                cy, cx, angle, thick = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, math.pi), rng.uniform(0.02, 0.1)
                mask = np.abs((yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)) < thick
            alpha = rng.uniform(0.5, 1.0)
            image[mask] = (1 - alpha) * image[mask] + alpha * colour
        out[i] = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return out


def _pink_noise(rng: np.random.Generator, height: int, width: int, channels: int,
                exponent: float = 2.0) -> np.ndarray:
    """Noise whose power falls as 1/f^exponent, like natural images; (H, W, C) in about [-1, 1]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx_ = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy ** 2 + fx_ ** 2)
    radius[0, 0] = 1.0
    planes = []
    for _ in range(channels):
        spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (exponent / 2)
        spectrum[0, 0] = 0
        noise = np.fft.irfft2(spectrum, s=(height, width))
        planes.append(noise / (np.abs(noise).max() + 1e-8))
    return np.stack(planes, axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# BatchNorm inversion

@dataclass
class _BNTap:
    node: str  # the BatchNorm's input node
    mean: torch.Tensor
    var: torch.Tensor


def _batchnorm_taps(gm: fx.GraphModule) -> list[_BNTap]:
    taps = []
    for node in gm.graph.nodes:
        if op_kind(node, gm) != "batch_norm":
            continue
        source = node.args[0]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            mean, var = module.running_mean, module.running_var
        else:  # aten: (input, weight, bias, running_mean, running_var, ...)
            args = list(node.args)
            if len(args) < 5 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in args[3:5]):
                continue
            mean, var = fetch_attr(gm, args[3].target), fetch_attr(gm, args[4].target)
        if isinstance(source, fx.Node) and mean is not None and var is not None:
            taps.append(_BNTap(source.name, mean.detach(), var.detach()))
    return taps


def _tapped_module(gm: fx.GraphModule, taps: list[_BNTap]) -> fx.GraphModule:
    """A copy of ``gm`` returning (first output, *BatchNorm inputs)."""
    import copy

    graph = copy.deepcopy(gm.graph)
    graph._codegen = fx.graph.CodeGen()
    nodes = {n.name: n for n in graph.nodes}
    old = graph.output_node()
    first = old.args[0]
    while isinstance(first, (tuple, list)):
        first = first[0]
    with graph.inserting_after(old):
        graph.output((first, *[nodes[t.node] for t in taps]))
    graph.erase_node(old)
    tapped = fx.GraphModule(gm, graph)
    tapped.eval()
    return tapped


def bn_inversion_images(model: Model, settings: SynthesisSettings, mean, std,
                        show_progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W, C) images synthesised by BatchNorm-statistics matching."""
    gm = model.clone().graph_module
    taps = _batchnorm_taps(gm)
    if not taps:
        raise GraphpruneError("bn-inversion needs BatchNorm layers; this model has none")
    for p in gm.parameters():
        p.requires_grad_(False)
    tapped = _tapped_module(gm, taps)
    shape = tuple(model.analysis_shape())[1:]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(settings.seed)
    batches = math.ceil(settings.num_samples / settings.batch_size)
    deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
    bar = progress_bar(total=batches * settings.steps, desc="bn-inversion", enabled=show_progress)
    images = []
    for b in range(batches):
        n = min(settings.batch_size, settings.num_samples - b * settings.batch_size)
        x = torch.randn((n, *shape), generator=gen).requires_grad_(True)
        with torch.no_grad():
            classes = tapped(x)[0].shape[-1]
        targets = torch.randint(0, classes, (n,), generator=gen)
        optimizer = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9))
        share = None if deadline is None else (deadline - time.monotonic()) / (batches - b)
        started = time.monotonic()
        for step in range(settings.steps):
            loss = bn_inversion_loss(tapped, taps, _jitter(x, gen), targets, settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
            if share is not None and time.monotonic() - started > share:
                break
        with torch.no_grad():
            pixels = (x.detach() * std_t + mean_t).clamp(0, 1)
        images.append((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    bar.close()
    return np.concatenate(images)


def bn_inversion_loss(tapped: fx.GraphModule, taps: list[_BNTap], x: torch.Tensor, targets: torch.Tensor,
                      settings: SynthesisSettings) -> torch.Tensor:
    outputs = tapped(x)
    logits, features = outputs[0], outputs[1:]
    stats = x.new_zeros(())
    for tap, feature in zip(taps, features):
        dims = [d for d in range(feature.dim()) if d != 1]
        stats = stats + torch.norm(feature.mean(dims) - tap.mean, 2) + \
            torch.norm(feature.var(dims, unbiased=False) - tap.var, 2)
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return stats + settings.class_weight * F.cross_entropy(logits, targets) + \
        settings.tv_weight * tv * x.shape[-1] + settings.l2_weight * x.pow(2).sum() / x.shape[0]


def bn_statistics_loss(model: Model, images: torch.Tensor) -> float:
    """The BatchNorm-statistics term alone for normalised ``images`` (lower = closer match)."""
    gm = model.graph_module
    taps = _batchnorm_taps(gm)
    tapped = _tapped_module(gm, taps)
    with torch.no_grad():
        features = tapped(images)[1:]
        total = 0.0
        for tap, feature in zip(taps, features):
            dims = [d for d in range(feature.dim()) if d != 1]
            total += float(torch.norm(feature.mean(dims) - tap.mean, 2) +
                           torch.norm(feature.var(dims, unbiased=False) - tap.var, 2))
    return total


def _jitter(x: torch.Tensor, gen: torch.Generator, max_shift: int | None = None) -> torch.Tensor:
    shift = max_shift if max_shift is not None else max(1, x.shape[-1] // 16)
    dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if bool(torch.rand(1, generator=gen) < 0.5):
        x = x.flip(-1)
    return x


# ------------------------------------------------------------------------------------------------
# Entry point with caching

MAX_SYNTHETIC_ELEMENTS = 2**30  # 4 GiB of float32 images


def synthetic_tiny_set(model: Model, settings: SynthesisSettings, prep, cache_dir: str | Path | None = None,
                       show_progress: bool = True):
    """``(TinySet, method)`` of synthetic images; cached as ``.npz`` in ``cache_dir`` by (method,
    settings, normalisation, input shape and, for bn-inversion, the model's hash)."""
    from .data import tiny_set_from_array

    method = resolve_method(model, settings.method)
    shape = tuple(model.analysis_shape())[1:]
    if len(shape) != 3:
        raise GraphpruneError("data-free synthesis needs an image model (N, C, H, W input)")
    if settings.num_samples * math.prod(shape) > MAX_SYNTHETIC_ELEMENTS:
        most = MAX_SYNTHETIC_ELEMENTS // math.prod(shape)
        raise GraphpruneError(f"{settings.num_samples:,} synthetic images of {'x'.join(map(str, shape))} would not "
                              f"fit in memory: lower num_samples to at most {most:,} (a tiny set is tens to a "
                              "thousand)", parameter="num_samples")
    path = None
    if cache_dir is not None:
        from .cache import cache_folder, model_fingerprint, settings_fingerprint

        key_parts = [method, asdict(settings), list(prep.mean), list(prep.std), shape]
        if method == "bn-inversion":
            key_parts.append(model_fingerprint(model))
        path = cache_folder(cache_dir) / f"synthetic-{settings_fingerprint(*key_parts)}.npz"  # before the work
        cached = _cached_images(path)
        if cached is not None:
            return tiny_set_from_array(cached, prep, f"synthetic:{method}"), method
    if method == "procedural":
        images = procedural_images(settings.num_samples, shape[1], shape[2], settings.seed, channels=shape[0])
    else:
        mean, std = (t.flatten().tolist() for t in prep.channel_stats())
        images = bn_inversion_images(model, settings, mean, std, show_progress)
    if path is not None:
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, images=images)
        tmp.replace(path)
    return tiny_set_from_array(images, prep, f"synthetic:{method}"), method


def _cached_images(path: Path) -> np.ndarray | None:
    """The images a previous run synthesised, or None (none there, or a damaged file: made again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            return cached["images"]
    except (OSError, ValueError, KeyError):
        return None
