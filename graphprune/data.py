"""The tiny set: images from a folder, a labels CSV or an ``.npz``, sampled, resized, normalised and split.

* A folder is searched at any depth for image files. When every image sits in a first-level
  sub-folder, the sub-folders are classes (sorted names -> 0..K-1, or their integer value when
  every name is an integer); labels are used only for evaluation and class-balanced sampling.
* A folder with a ``labels.csv`` (or that CSV given itself) is the images the CSV names, paths
  relative to its folder, with its integer labels (:func:`read_labels_csv`): the first column
  names the files; the label column is one named ``label``, ``class_index``, ``target``,
  ``class``, ... (``LABEL_COLUMNS``) or ending in ``_class_index``, ``_label``, ...
  (``LABEL_SUFFIXES``), the first of them whose values are all integers, else the second of a
  two-column file; a first row whose first cell is a file of the folder and whose second is an
  integer is data (a header-less ``file,label`` file).
  A missing file, no label column, a label that is not a non-negative integer, a file named twice
  is one line. Images of the folder the CSV does not name are not read.
* An ``.npz`` holds ``images`` (N, H, W, C uint8) and optionally ``labels`` (N,): class indices
  >= 0, or all -1 (unlabelled); other negatives, or -1 for some images only, are one line.
* ``num_samples`` images are drawn with ``seed`` (round-robin over classes when labels exist, so
  the draw is class-balanced), resized (shorter side to the model's size, or to that size divided
  by ``crop``: 0.875 is ImageNet's 256 -> 224) and centre-cropped to the model's input size,
  converted to the model's channel count (grey, RGB and RGBA: a 4-channel model gets grey and
  RGB images opaque, alpha 1; any other count is one line naming the data), and normalised with
  ``mean``/``std``.
* :func:`split_holdout` keeps a held-out part (default 20%, at least 16 images) to measure
  recoverability on images the adaptors never trained on.
Unreadable files are skipped and counted; a set with no readable image is an error.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import GraphpruneError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
LABELS_FILE = "labels.csv"
# The label column of a CSV: a header cell equal to one of LABEL_COLUMNS, else one ending in one of
# LABEL_SUFFIXES (ImageNet lists' ``imagenet_class_index``), earlier entries first; the first of them
# whose values are all integers (``_label_column``).
LABEL_COLUMNS = ("label", "labels", "class_index", "class_id", "target", "category_id", "class", "category", "y")
LABEL_SUFFIXES = ("_class_index", "_class_id", "_label", "_target")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_LABEL = 2**31 - 1


@dataclass
class TinySet:
    """Normalised images (N, C, H, W float32) and labels (N,; -1 when unknown)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""
    skipped: int = 0
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self) > 0

    def subset(self, index) -> "TinySet":
        index = torch.as_tensor(index, dtype=torch.long)
        return TinySet(self.images[index], self.labels[index], self.source, self.skipped, self.classes)

    def without_labels(self) -> "TinySet":
        """The same images with every label unknown (-1): compared with a reference model, not scored."""
        return TinySet(self.images, torch.full((len(self),), -1, dtype=torch.long), self.source, self.skipped,
                       self.classes)

    def summary(self) -> dict:
        return {"source": self.source, "images": len(self), "skipped_unreadable": self.skipped,
                "labelled": self.has_labels, "shape": list(self.images.shape[1:])}


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs: ``size`` is (C, H, W)."""

    size: tuple[int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # the centre crop's share of the resized image: 1.0 resizes the shorter side to the model's size;
    # 0.875 is ImageNet's evaluation (shorter side to 256, centre 224). EfficientNet-Lite0 with its
    # ImageNet weights scores 85.1 on the 800 imagenet-eval photos at 1.0, 87.1 at 0.875.
    crop: float = 1.0

    def check(self) -> None:
        if not 0.0 < self.crop <= 1.0:
            raise GraphpruneError(f"crop must be in (0, 1], got {self.crop}", parameter="crop")

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.size[0]
        mean = _fit_channels(self.mean, channels, "mean")
        std = _fit_channels(self.std, channels, "std")
        if any(s <= 0 for s in std):
            raise GraphpruneError("std values must be positive", parameter="std")
        return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def _fit_channels(values, channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1 and len(values) == 3:  # grey model, RGB statistics: use their average
        return (sum(values) / 3,)
    if len(values) == 1:
        return values * channels
    default = " (ImageNet's, the default)" if values == tuple(IMAGENET_MEAN if name == "mean" else IMAGENET_STD) else ""
    raise GraphpruneError(f"{name} has {len(values)} values{default}; the model takes {channels} channels: give "
                          f"--{name} with {channels} values", parameter=name)


def load_tiny_set(path: str | Path, prep: Preprocessing, num_samples: int | None = None,
                  seed: int = 0) -> TinySet:
    """Read, sample and preprocess a tiny set (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"data not found: {path}")
    if path.is_dir():
        raw, labels, classes, skipped = _read_folder(path, num_samples, seed)
    elif path.suffix.lower() == ".npz":
        raw, labels, classes, skipped = _read_npz(path, num_samples, seed)
    elif path.suffix.lower() == ".csv":
        raw, labels, skipped = _read_files(*read_labels_csv(path), num_samples, seed)
        classes = []
    else:
        raise GraphpruneError(f"path must be a folder of images, a labels .csv or an .npz file, got {path.name}",
                              parameter="path")
    if not raw:
        raise GraphpruneError(f"no readable images in {path}" + (f" ({skipped} unreadable)" if skipped else ""))
    return _preprocess(raw, labels, prep, str(path), skipped, classes)


def tiny_set_from_array(images: np.ndarray, prep: Preprocessing, source: str) -> TinySet:
    """A tiny set from uint8 (N, H, W, C) images without labels (synthetic data)."""
    raw = [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None] for img in images]
    return _preprocess(raw, [-1] * len(raw), prep, source, 0, [])


def _preprocess(raw, labels, prep: Preprocessing, source: str, skipped: int, classes) -> TinySet:
    prep.check()
    if labels and max(labels) > MAX_LABEL:  # a class index, not a number torch's int64 may not hold
        raise GraphpruneError(f"{source}: labels are class indices up to {MAX_LABEL}, got {max(labels)}")
    images = torch.cat([_to_model_size(img, prep.size, source, prep.crop) for img in raw])
    mean, std = prep.channel_stats()
    images = (images - mean) / std
    return TinySet(images, torch.as_tensor(labels, dtype=torch.long), source, skipped, classes)


def _read_npz(path: Path, num_samples, seed):
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise GraphpruneError(f"{path.name} has no 'images' array (found: {', '.join(data.files) or 'none'})")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
    except GraphpruneError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise GraphpruneError(f"cannot read {path.name} as .npz ({type(exc).__name__})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0 or not 1 <= images.shape[-1] <= 4:
        raise GraphpruneError(f"{path.name}: 'images' must be (N, H, W, C) with C in 1..4, got {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise GraphpruneError(f"{path.name}: 'images' must be uint8, got {images.dtype}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise GraphpruneError(f"{path.name}: 'labels' must be N integers matching 'images'")
        unlabelled = int((labels == -1).sum())
        if (labels < -1).any() or 0 < unlabelled < len(labels):  # a set is labelled whole or not at all
            raise GraphpruneError(f"{path.name}: 'labels' must be class indices >= 0, or all -1 for unlabelled "
                                  f"images; got {int(labels.min())}"
                                  + (f" ({unlabelled} of {len(labels)} are -1)" if unlabelled else ""))
    order = sample_indices(labels, images.shape[0], num_samples, seed)
    raw = [torch.from_numpy(np.ascontiguousarray(images[i])).permute(2, 0, 1)[None] for i in order]
    out_labels = [int(labels[i]) for i in order] if labels is not None else [-1] * len(order)
    return raw, out_labels, [], 0


def _read_folder(root: Path, num_samples, seed):
    if (root / LABELS_FILE).is_file():
        raw, labels, skipped = _read_files(*read_labels_csv(root / LABELS_FILE), num_samples, seed)
        return raw, labels, [], skipped
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GraphpruneError(f"no image files in {root}")
    parents = {p.relative_to(root).parts[0] if len(p.relative_to(root).parts) == 2 else None for p in files}
    classes: list[str] = []
    labels = None
    if None not in parents and len(parents) > 1:
        classes = sorted(parents, key=lambda n: (int(n), n) if n.isdigit() else (float("inf"), n))
        index = {c: (int(c) if all(n.isdigit() for n in classes) else i) for i, c in enumerate(classes)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in files])
    raw, out_labels, skipped = _read_files(files, labels, num_samples, seed)
    return raw, out_labels, classes, skipped


def _read_files(files: list[Path], labels, num_samples, seed):
    """Images of ``files`` (labels ``labels`` or None) in sampled order until ``num_samples`` are
    readable: (images, labels, unreadable count)."""
    order = sample_indices(labels, len(files), None, seed)
    raw, out_labels, skipped = [], [], 0
    for i in order:
        if num_samples is not None and len(raw) >= num_samples:
            break
        image = _read_image(files[i])
        if image is None:
            skipped += 1
            continue
        raw.append(image)
        out_labels.append(int(labels[i]) if labels is not None else -1)
    return raw, out_labels, skipped


def read_labels_csv(path: Path) -> tuple[list[Path], np.ndarray]:
    """The files a labels CSV names (relative to its folder) and their integer labels (see the
    module docstring); one line for anything else."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GraphpruneError(f"cannot read {path.name} as CSV: {first_line(exc)}") from None
    header = None
    if rows and not _is_data_row(rows[0][1], path.parent):
        header, rows = rows[0][1], rows[1:]
    if not rows:
        raise GraphpruneError(f"{path.name} lists no images")
    column = 1 if header is None else _label_column(header, rows, path.name)
    files, labels, seen = [], [], set()
    for line, row in rows:
        if len(row) <= column:
            raise GraphpruneError(f"{path.name} line {line} has {len(row)} columns; "
                                  f"the labels are in column {column + 1}")
        name, label = row[0], row[column]
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:  # stay inside the folder
            raise GraphpruneError(f"{path.name} line {line}: '{name}' is not a file name inside {path.parent}")
        if name in seen:
            raise GraphpruneError(f"{path.name} names '{name}' twice (line {line})")
        if not _is_label(label):
            raise GraphpruneError(f"{path.name} line {line}: label '{label}' is not a non-negative integer"
                                  + ("" if header is None else f" (column '{header[column]}')"))
        seen.add(name)
        files.append(path.parent / name)
        labels.append(int(label))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise GraphpruneError(f"{path.name} names {len(missing)} files not in {path.parent}, "
                              f"e.g. '{missing[0].relative_to(path.parent)}'")
    return files, np.array(labels)


def _is_label(cell: str) -> bool:
    return cell.isascii() and cell.isdigit()


def _is_data_row(row: list[str], folder: Path) -> bool:
    """A header-less ``file,label`` row: a file of the folder, then an integer."""
    return len(row) >= 2 and _is_label(row[1]) and bool(row[0]) and (folder / row[0]).is_file()


def _label_column(header: list[str], rows, name: str) -> int:
    """The label column: the first named like a label (``LABEL_COLUMNS``, then ``LABEL_SUFFIXES``)
    whose values are all integers (a ``class`` of names is passed over for a ``class_index``),
    else the second of two columns."""
    lowered = [cell.lower() for cell in header]
    candidates = [i for wanted in LABEL_COLUMNS for i in range(1, len(header)) if lowered[i] == wanted]
    candidates += [i for suffix in LABEL_SUFFIXES for i in range(1, len(header))
                   if lowered[i].endswith(suffix) and i not in candidates]
    if not candidates and len(header) == 2:
        candidates = [1]
    if not candidates:
        raise GraphpruneError(f"{name} has no label column (columns: {', '.join(header)}); name the column of "
                              "integer labels 'label', 'class', 'class_index' or 'target'")
    for column in candidates:
        if all(len(row) > column and _is_label(row[column]) for _, row in rows):
            return column
    return candidates[0]  # not all integers: the rows' check names the first bad value


def _read_image(path: Path) -> torch.Tensor | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def sample_indices(labels, count: int, num_samples: int | None, seed: int) -> list[int]:
    """A seeded order of ``count`` items; round-robin over classes when labels are given, so any
    prefix is class-balanced. Truncated to ``num_samples``."""
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(count).tolist()
    else:
        labels = np.asarray(labels)
        per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
        rng.shuffle(per_class)
        order = []
        while any(per_class):
            for bucket in per_class:
                if bucket:
                    order.append(bucket.pop(0))
    if num_samples is not None:
        if num_samples <= 0:
            raise GraphpruneError(f"num_samples must be positive, got {num_samples}", parameter="num_samples")
        order = order[:num_samples]
    return order


def _to_model_size(image: torch.Tensor, size: tuple[int, int, int], source: str, crop: float = 1.0) -> torch.Tensor:
    """uint8 (1, c, h, w) -> float (1, C, H, W) in [0, 1]: shorter side resized to the model's size
    divided by ``crop``, centre-cropped to the model's size."""
    channels, height, width = size
    x = image.float() / 255.0
    if x.shape[1] == 4 and channels != 4:  # RGBA photo: drop alpha
        x = x[:, :3]
    if channels == 1 and x.shape[1] == 3:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif channels in (3, 4) and x.shape[1] in (1, 3) and x.shape[1] != channels:  # grey to RGB; RGB(A) opaque
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1) if channels == 4 else x
    elif x.shape[1] != channels:
        raise GraphpruneError(f"{source}: images have {x.shape[1]} channels; the model takes {channels} "
                              "(grey, RGB and RGBA images are converted, other counts cannot be)")
    h, w = x.shape[-2:]
    if (h, w) != (height, width) or crop < 1.0:
        scale = max(height / h, width / w) / crop
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[..., top:top + height, left:left + width]
    return x.contiguous()


def split_holdout(tiny: TinySet, fraction: float = 0.2, minimum: int = 16, seed: int = 0) -> tuple[TinySet, TinySet]:
    """(train, held-out): ``max(minimum, fraction * N)`` images held out, never more than half."""
    n = len(tiny)
    if n < 4:
        raise GraphpruneError(f"the tiny set has {n} images; need at least 4")
    held = min(max(minimum, round(fraction * n)), n // 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tiny.subset(order[held:]), tiny.subset(order[:held])
