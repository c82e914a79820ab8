"""A small network whose head reads a value from before its last block (a neck's long shortcut, as
in SVTR's or a U-Net's), exported to ONNX: what a cut (:func:`graphprune.features.cut_before`) is for."""

from __future__ import annotations

from pathlib import Path

import torch


class LongShortcut(torch.nn.Module):
    """stem -> h; h -> block -> widening conv -> block -> y; Concat(h, y) -> conv -> pool -> fc: what
    comes after the second block reads h, a value from before it."""

    def __init__(self):
        super().__init__()
        conv = lambda cin, cout: torch.nn.Conv2d(cin, cout, 3, padding=1)  # noqa: E731
        self.stem, self.a1, self.a2, self.widen = conv(3, 8), conv(8, 8), conv(8, 8), conv(8, 12)
        self.b1, self.b2 = conv(12, 12), conv(12, 12)
        self.fuse, self.fc = conv(20, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = h + self.a2(torch.relu(self.a1(h)))
        y = torch.relu(self.widen(y))  # another shape: the second block's region starts after h
        y = y + self.b2(torch.relu(self.b1(y)))
        z = torch.relu(self.fuse(torch.cat([h, y], 1)))
        return self.fc(z.mean((2, 3)))


def long_shortcut_onnx(directory: Path) -> Path:
    """:class:`LongShortcut` (seeded weights) as ``directory``/long.onnx, 12 x 12 input, dynamic batch."""
    torch.manual_seed(0)
    path = Path(directory) / "long.onnx"
    torch.onnx.export(LongShortcut().eval(), (torch.randn(1, 3, 12, 12),), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path
