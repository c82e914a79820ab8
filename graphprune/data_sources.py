"""Where a tiny set's raw images come from: a folder, a labels CSV or an ``.npz`` (:func:`read_source`).

* A folder is searched at any depth for image files (``IMAGE_SUFFIXES``, any case), through
  symlinked folders (each real folder once: a link loop ends; not a link to a folder that holds
  the data folder, such as ``..`` or ``/``). Names starting with a dot are not
  the set's images (``.DS_Store``, the ``._photo.jpg`` files macOS leaves on shared drives,
  ``.cache/``). A folder whose images all lie under one sub-folder is read from that sub-folder
  (``imagenet/train/<class>/...``). When every image sits in a first-level sub-folder and there are
  at least two, the sub-folders are classes (sorted names -> 0..K-1, or their integer value when
  every name is an integer); labels are used only for evaluation and class-balanced sampling. Where
  two or more sub-folders hold images but some images lie elsewhere, where one folder named by a
  class index holds them all (as likely a wrapper), or where they lie two levels down under several
  folders (``train/<class>/`` next to ``val/<class>/``), there are no classes, said in one line.
* A folder with a ``labels.csv`` (or that CSV given itself) is the images the CSV names, paths
  relative to its folder, with its integer labels (:func:`read_labels_csv`): the first column
  names the files; the label column is one named ``label``, ``class_index``, ``target``,
  ``class``, ... (``LABEL_COLUMNS``) or ending in ``_class_index``, ``_label``, ...
  (``LABEL_SUFFIXES``), the first of them whose values are all integers, else the second of a
  two-column file; a first row whose first cell is a file of the folder and whose second is an
  integer is data (a header-less ``file,label`` file).
  Columns split at commas, else (no comma in the first line) at semicolons or tabs. A missing file,
  no label column, a label that is not a non-negative integer, a file named twice, a first column
  named as labels is one line. Images of the folder the CSV does not name are not read, said in one line.
* An ``.npz`` holds ``images`` (N, H, W, C uint8, or N, H, W grey) and optionally ``labels`` (N,):
  class indices >= 0, or all -1 (unlabelled); other negatives, or -1 for some images only, are one
  line; so are a ``.npy`` file, pickled objects (never loaded) and one image without its N axis.
* Pixels: 8-bit images as stored; 16- and 32-bit integer images (PNG, TIFF) scaled from the depth
  a PNG's sBIT chunk states, else the depth their values fit (8, 10, 12 or 16 bits: a 12-bit
  camera's image in a 16-bit file; a dark 16-bit photo without sBIT reads brighter), float images
  from [0, 1] ([0, 255] where finite values exceed 1; NaN read as 0): Pillow's RGB conversion
  clipped them, a 16-bit PNG read all white; grey, palette and CMYK images in RGB; RGBA's alpha
  dropped, not composited (what torchvision's folder loader, ``convert("RGB")``, feeds a model in
  the pipelines users deploy); an EXIF orientation applied, as a viewer shows the photo (a phone
  stores a portrait photo sideways with the tag).

Unreadable files are skipped and returned (the caller names the first); ``num_samples`` images are
drawn with ``seed``, round-robin over classes where there are labels (:func:`sample_indices`).
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import GraphpruneError, first_line

log = logging.getLogger("graphprune")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
LABELS_FILE = "labels.csv"
# The label column of a CSV: a header cell equal to one of LABEL_COLUMNS, else one ending in one of
# LABEL_SUFFIXES (ImageNet lists' ``imagenet_class_index``), earlier entries first; the first of them
# whose values are all integers (``_label_column``).
LABEL_COLUMNS = ("label", "labels", "class_index", "class_id", "target", "category_id", "class", "category", "y")
LABEL_SUFFIXES = ("_class_index", "_class_id", "_label", "_target")
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow modes with more than 8 bits
Convert = Callable[[torch.Tensor], torch.Tensor]  # applied to each uint8 (1, C, H, W) image as read


def as_read(image: torch.Tensor) -> torch.Tensor:
    """The :data:`Convert` that keeps an image as read."""
    return image


@dataclass
class RawImages:
    """Images in sampled order (uint8 (1, C, H, W), or as ``convert`` made them), their labels (-1
    unknown), class names, and the files that could not be read."""

    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def read_source(path: Path, num_samples: int | None, seed: int, convert: Convert = as_read) -> RawImages:
    """The images of a folder, a labels ``.csv`` or an ``.npz`` (module docstring), each passed
    through ``convert`` as it is read: a photo is kept at the model's size, not at its own (one
    10000 x 10000 image held 3.3 GB until the set was resized)."""
    if path.is_dir():
        if (path / LABELS_FILE).is_file():
            files, labels = read_labels_csv(path / LABELS_FILE)
            unnamed = len(set(image_files(path)) - set(files))
            if unnamed:
                log.warning("%s names %d of the %d images in %s; the other %d %s not read", LABELS_FILE, len(files),
                            len(files) + unnamed, path, unnamed, "is" if unnamed == 1 else "are")
            return _read_files(files, labels, num_samples, seed, convert)
        return _read_folder(path, num_samples, seed, convert)
    if path.suffix.lower() == ".npz":
        return _read_npz(path, num_samples, seed, convert)
    if path.suffix.lower() == ".csv":
        return _read_files(*read_labels_csv(path), num_samples, seed, convert)
    raise GraphpruneError(f"path must be a folder of images, a labels .csv or an .npz file, got {path.name}",
                          parameter="path")


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


def _read_npz(path: Path, num_samples, seed, convert: Convert = as_read) -> RawImages:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise GraphpruneError(f"{path.name} is one .npy array, not an .npz archive: save it with "
                                  "np.savez(path, images=array)")
        with loaded as data:
            if "images" not in data.files:
                raise GraphpruneError(f"{path.name} has no 'images' array (found: {', '.join(data.files) or 'none'})")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
            others = [name for name in data.files if name not in ("images", "labels")]
    except GraphpruneError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if "pickle" in str(exc).lower():
            raise GraphpruneError(f"{path.name} holds pickled Python objects, which graphprune never loads: "
                                  "save plain uint8 arrays") from None
        raise GraphpruneError(f"cannot read {path.name} as .npz ({type(exc).__name__})") from None
    if labels is None and others:
        log.warning("%s: no 'labels' array, so the images are unlabelled (not read: %s)", path.name, ", ".join(others))
    if images.ndim == 3 and images.shape[-1] in (3, 4):
        raise GraphpruneError(f"{path.name}: 'images' of shape {tuple(images.shape)} reads as {images.shape[0]} grey "
                              f"images {images.shape[1]}x{images.shape[2]}; one colour image? give it as "
                              f"(1, {', '.join(map(str, images.shape))})")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0 or not 1 <= images.shape[-1] <= 4 or 0 in images.shape[1:3]:
        raise GraphpruneError(f"{path.name}: 'images' must be (N, H, W, C) with C in 1..4 and H, W above 0, "
                              f"got {tuple(images.shape)}")
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
    raw = [convert(torch.from_numpy(np.ascontiguousarray(images[i])).permute(2, 0, 1)[None]) for i in order]
    out_labels = [int(labels[i]) for i in order] if labels is not None else [-1] * len(order)
    return RawImages(raw, out_labels)


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (module docstring: symlinked folders, dot names)."""
    found, seen = [], set()
    top = os.path.realpath(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder read already
            dirs[:] = []
            continue
        seen.add(real)
        # a link to a folder holding this one (.., /) would read the data's surroundings, or the disk
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _holds(os.path.realpath(os.path.join(folder, d)),
                                                                           top)]
        found += [Path(folder, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
                  and os.path.isfile(os.path.join(folder, name))]  # not a broken link
    return sorted(found)


def _holds(folder: str, path: str) -> bool:
    """Whether ``folder`` is ``path`` or one of its ancestors (real paths)."""
    return os.path.commonpath([folder, path]) == folder


def is_class_index(name: str) -> bool:
    """A folder named by a class index: ASCII digits (``str.isdigit`` also takes '²', which ``int`` refuses)."""
    return name.isascii() and name.isdigit()


def _read_folder(root: Path, num_samples, seed, convert: Convert = as_read) -> RawImages:
    files = image_files(root)
    if not files:
        raise GraphpruneError(f"no image files in {root}")
    parts = [f.relative_to(root).parts for f in files]
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # one folder holding everything: train/<class>/...
    in_folders = [p for p in parts if len(p) == 2]
    folders = {p[0] for p in in_folders}
    classes: list[str] = []
    labels = None
    if len(folders) > 1 and len(in_folders) == len(parts):
        classes = sorted(folders, key=lambda n: (int(n), n) if is_class_index(n) else (float("inf"), n))
        index = {c: (int(c) if all(is_class_index(n) for n in classes) else i) for i, c in enumerate(classes)}
        labels = np.array([index[p[0]] for p in parts])
    elif len(folders) > 1:
        elsewhere = next(p for p in parts if len(p) != 2)
        log.warning("%s: not read as class folders: %d of %d images lie outside its %d sub-folders (e.g. %s)", root,
                    len(parts) - len(in_folders), len(parts), len(folders), os.path.join(*elsewhere))
    elif len(in_folders) == len(parts) and is_class_index(next(iter(folders))):
        log.warning("%s: its one sub-folder, %s, is not read as a class (one folder is as likely a wrapper); "
                    "give a labels.csv to label its images", root, next(iter(folders)))
    elif all(len(p) == 3 for p in parts) and len({p[0] for p in parts}) > 1:
        log.warning("%s: not read as class folders: the images lie two levels down (e.g. %s); give the folder that "
                    "holds the class folders", root, os.path.join(*parts[0]))
    raw = _read_files(files, labels, num_samples, seed, convert)
    raw.classes = classes
    return raw


def _read_files(files: list[Path], labels, num_samples, seed, convert: Convert = as_read) -> RawImages:
    """Images of ``files`` (labels ``labels`` or None) in sampled order until ``num_samples`` are readable."""
    raw = RawImages()
    for i in sample_indices(labels, len(files), None, seed):
        if num_samples is not None and len(raw.images) >= num_samples:
            break
        image = _read_image(files[i])
        if image is None:
            raw.skipped.append(files[i])
            continue
        raw.images.append(convert(image))
        raw.labels.append(int(labels[i]) if labels is not None else -1)
    return raw


def read_labels_csv(path: Path) -> tuple[list[Path], np.ndarray]:
    """The files a labels CSV names (relative to its folder) and their integer labels (see the
    module docstring); one line for anything else."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
            f.seek(0)
            # a spreadsheet in a comma-decimal locale writes ';', some tools tabs
            delimiter = "," if "," in first else ";" if ";" in first else "\t" if "\t" in first else ","
            reader = csv.reader(f, delimiter=delimiter)
            rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GraphpruneError(f"cannot read {path.name} as CSV: {first_line(exc)}") from None
    header = None
    if rows and not _is_data_row(rows[0][1], path.parent):
        header, rows = rows[0][1], rows[1:]
    if not rows:
        raise GraphpruneError(f"{path.name} lists no images")
    if header is not None and header[0].lower() in LABEL_COLUMNS and len(header) > 1:
        raise GraphpruneError(f"{path.name}: the first column must name the files; '{header[0]}' holds the labels "
                              f"(put the file column first)")
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
    """A header-less ``file,label`` row: a file of the folder (or a name with an image suffix: a
    missing file is then named as such, not taken for a header), then an integer."""
    return len(row) >= 2 and _is_label(row[1]) and bool(row[0]) and \
        ((folder / row[0]).is_file() or Path(row[0]).suffix.lower() in IMAGE_SUFFIXES)


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
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            deep_png = img.format == "PNG" and img.mode in HIGH_DEPTH_MODES  # a transposed copy has no format
            bits = _png_significant_bits(path) if deep_png else None
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block: the pixels as stored
                pass
            array = _rgb_uint8(img, bits)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def _rgb_uint8(img, significant_bits: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 of a Pillow image of any mode (module docstring: deeper pixels scaled from
    ``significant_bits`` where the file states them)."""
    if img.mode not in HIGH_DEPTH_MODES:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    if img.mode == "F":
        scale = 1.0 if top <= 1.0 else 255.0
    elif significant_bits:
        scale = float(2**significant_bits - 1)
    else:  # the depth the values fit: 8, 10, 12 (a camera's or a scanner's in a 16-bit file) or 16 bits
        scale = next((float(2**bits - 1) for bits in (8, 10, 12) if top <= 2**bits - 1), 65535.0)
    values = np.nan_to_num(values, nan=0.0, posinf=scale, neginf=0.0)
    grey = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _png_significant_bits(path: Path) -> int | None:
    """The grey depth a PNG's sBIT chunk states (a 12-bit camera's image in a 16-bit file), if any:
    Pillow does not read it. Chunks are read up to the first image data."""
    try:
        with open(path, "rb") as stream:
            if stream.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):
                head = stream.read(8)
                if len(head) < 8 or head[4:] in (b"IDAT", b"IEND"):
                    return None
                length = int.from_bytes(head[:4], "big")
                if head[4:] == b"sBIT":
                    bits = stream.read(min(length, 4))[:1]
                    return bits[0] if bits and 1 <= bits[0] <= 16 else None
                stream.seek(length + 4, 1)  # the chunk's data and its CRC
    except OSError:
        return None
    return None
