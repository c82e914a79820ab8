"""The orientation classifier's pages (benchmarks/text_lines.pages): page i stacks rendered lines
6i..6i+5 and is turned clockwise by its class's degrees, so turning it back gives those lines,
upright, in order."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import text_lines


def test_a_page_turned_back_by_its_class_holds_its_lines_upright(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.setattr(text_lines, "CACHE", tmp_path)
    images, labels = text_lines.pages(8, seed=5)
    lines, _ = text_lines.render(8 * text_lines.PAGE_LINES, 5)
    assert images.shape == (8, 320, 320, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    band = (320 - text_lines.PAGE_LINES * text_lines.SIZE[0]) // 2
    for i, (image, label) in enumerate(zip(images, labels)):
        upright = np.rot90(image, label)  # counter-clockwise by the class's quarter turns
        stacked = lines[i * text_lines.PAGE_LINES:(i + 1) * text_lines.PAGE_LINES].reshape(-1, 320, 3)
        assert np.array_equal(upright[band:band + len(stacked)], stacked)
        assert upright[:band].std() == 0
        if label:
            assert not np.array_equal(image, upright)
