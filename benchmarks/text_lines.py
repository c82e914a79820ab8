"""Text lines rendered with Pillow's bundled font: a text recogniser's tiny and evaluation sets.

No photo here holds a line of text, so a recogniser (PP-OCRv4's) judged on them would be judged on
its blank outputs. These are rendered instead, nothing downloaded: a line of 1-3 random "words"
(letters and digits that this font does not draw alike in either case or as another digit, and
two marks) in Pillow's bundled FreeType font at 22-34 px, dark on a light
background of random tone, at a random horizontal offset, with mild noise; then resized to the
model's 48 x 320 as any image is. A seed fixes a set; the tiny set and the evaluation set use
different seeds, so they share no line. :func:`read_rate` is the share of lines a recogniser reads
exactly (greedy CTC decoding with the dictionary in its file's ``character`` metadata): the check
that the original reads this text at all. :func:`pages` stacks such lines into square pages turned
by 0, 90, 180 or 270 degrees: a document-orientation classifier's labelled sets.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np

from benchmarks.common import CACHE

AMBIGUOUS = set("lI1O0oSsCcVvWwXxZzKkPpUu")  # alike in upper and lower case or to a digit in this font
CHARACTERS = [c for c in string.ascii_letters + string.digits + "-:" if c not in AMBIGUOUS]
SIZE = (48, 320)  # height, width of PP-OCR's recogniser input


def _line(rng: np.random.Generator) -> str:
    words = ["".join(rng.choice(CHARACTERS, rng.integers(2, 8))) for _ in range(rng.integers(1, 4))]
    return " ".join(words)


def render(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` lines, (N, 48, 320, 3) uint8, and their text; cached under benchmarks/cache."""
    path = CACHE / f"text_lines_{count}_{seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return data["images"], [str(t) for t in data["texts"]]
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, texts = [], []
    for _ in range(count):
        text = _line(rng)
        font = ImageFont.load_default(size=int(rng.integers(22, 35)))
        background = int(rng.integers(170, 256))
        ink = int(rng.integers(0, 90))
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGB", (max(SIZE[1], right + 16), SIZE[0]), (background,) * 3)
        x = int(rng.integers(2, max(3, canvas.width - right - 2)))
        y = (SIZE[0] - (bottom - top)) // 2 - top
        ImageDraw.Draw(canvas).text((x, y), text, fill=(ink,) * 3, font=font)
        pixels = np.asarray(canvas.resize((SIZE[1], SIZE[0]), Image.BILINEAR), dtype=np.float32)
        pixels = pixels + rng.normal(0, 6, pixels.shape)
        images.append(np.clip(pixels, 0, 255).astype(np.uint8))
        texts.append(text)
    images = np.stack(images)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, texts=np.array(texts))
    os.replace(tmp, path)
    return images, texts


def read_rate(outputs: np.ndarray, texts: list[str], dictionary: list[str]) -> float:
    """The share of ``texts`` that (N, T, K) character probabilities read exactly: greedy CTC (the
    top class per position, repeats merged, class 0 the blank; class i > 0 is ``dictionary[i - 1]``,
    the last class a space, as PaddleOCR's CTC label decoder reads its dictionary), spaces ignored:
    the recogniser reads the gaps between words its own way."""
    from graphprune.ctc import ctc_text

    classes = ["", *dictionary, " "]
    read = 0
    for best, text in zip(outputs.argmax(-1).tolist(), texts):
        read += "".join(classes[c] for c in ctc_text(best, blank=0)).replace(" ", "") == text.replace(" ", "")
    return read / len(texts)


def dictionary_of(path: Path) -> list[str]:
    """The characters a PaddleOCR recogniser's ONNX file lists in its ``character`` metadata."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta["character"].splitlines()


PAGE_LINES = 6  # lines a page stacks: 6 x 48 px on a 320 x 320 page
ROTATIONS = (0, 90, 180, 270)  # a page's class: how far it is turned clockwise (PP-LCNet's orientation labels)


def pages(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` square pages of ``PAGE_LINES`` rendered lines each, (N, 320, 320, 3) uint8, page i
    turned clockwise by ``ROTATIONS[i % 4]``, and those classes (an orientation classifier's
    labelled tiny and evaluation sets); the lines come from :func:`render` with the same seed."""
    lines, _ = render(count * PAGE_LINES, seed)
    side = SIZE[1]
    out = np.empty((count, side, side, 3), np.uint8)
    labels = np.arange(count) % len(ROTATIONS)
    for i in range(count):
        stack = lines[i * PAGE_LINES:(i + 1) * PAGE_LINES]
        page = np.empty((side, side, 3), np.uint8)
        page[:] = stack[0, :2].reshape(-1, 3).mean(0).astype(np.uint8)  # the first line's background
        top = (side - PAGE_LINES * SIZE[0]) // 2
        page[top:top + PAGE_LINES * SIZE[0]] = stack.reshape(-1, side, 3)
        out[i] = np.rot90(page, -labels[i])  # np.rot90 turns counter-clockwise
    return out, labels
