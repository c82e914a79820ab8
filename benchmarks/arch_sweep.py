"""Architectures nobody on the team wrote a test for, through ``graphprune optimize`` as a user runs it.

Each architecture (timm or torchvision, random weights: nothing is downloaded) is exported to ONNX
(TorchScript exporter, opset 17, dynamic batch) at a small size, then optimized from the command
line, data-free (procedural images), float, at a 10% target under a 120 s ``--time-budget``, in a
subprocess with a 10-minute timeout. A row records whether a file was written (or the one line that
refused it), the wall time, what ``find_blocks`` found by kind, how many identical twins profiling
left unmeasured, the blocks dropped, the measured cut and the scoring steps the budget allowed.
What it checks is that any well-formed network goes through, in about the time asked; the cuts of
random weights say nothing about accuracy.

    python -m benchmarks.arch_sweep run [--archs timm:ghostnet_100:128,...]   # rows resume
    python -m benchmarks.arch_sweep report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.compare_rows import this_machine
from benchmarks.rowfile import RowFile

ROWS = RowFile("arch_sweep")
# timm architectures whose blocks take forms the tests do not build (ghost, dual-path, split-attention,
# CSP, OSA, reparameterisable, hybrid conv-attention, cross-covariance attention, ...); torchvision's
# are in the tests' conftest already
ARCHS = tuple(f"timm:{name}" for name in (
    "ghostnet_100:128", "hgnetv2_b0:128", "dla34:128", "res2net50_14w_8s:128", "repvgg_a0:128", "mobilevit_xxs:128",
    "efficientformer_l1:224", "levit_128s:224", "poolformer_s12:128", "rexnet_100:128", "dpn68:128",
    "resnest14d:128", "ese_vovnet19b_dw:128", "cspdarknet53:128", "edgenext_xx_small:128", "fastvit_t8:128",
    "repvit_m0_9:128", "mobilenetv4_conv_small:128", "xcit_nano_12_p16_224:224", "efficientvit_b0:128",
    "hrnet_w18_small:128", "inception_next_tiny:128", "ghostnetv2_100:128"))
OPTIMIZE = ("--data-free", "--synthetic", "procedural", "--num-samples", "32", "--latency-cut", "0.1",
            "--time-budget", "120", "--quantize", "none", "--recovery-iterations", "20", "--no-cache", "--quiet",
            "--layers", "auto")  # the layers outside the blocks where blocks alone fall short (ReXNet, DPN, VoVNet)
TIMEOUT_S = 600


def _module(source: str, name: str):
    import torch

    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def export(spec: str, folder: Path) -> Path:
    import torch

    source, name, size = spec.split(":")
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_module(source, name), (torch.randn(1, 3, int(size), int(size)),), str(path),
                          opset_version=17, dynamo=False, input_names=["input"], output_names=["out"],
                          dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
    return path


def run_one(spec: str, folder: Path) -> dict:
    row = {"id": spec, "cpu": this_machine(), "settings": " ".join(OPTIMIZE)}
    try:
        path = export(spec, folder)
    except Exception as exc:  # the exporter's failure, not graphprune's: recorded as such
        return {**row, "exported": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    report = folder / f"{path.stem}.report.json"
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "graphprune", "optimize", str(path), *OPTIMIZE, "-o",
                               str(folder / f"{path.stem}.fast.onnx"), "--report", str(report)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        rc, stderr = None, f"killed after {TIMEOUT_S} s"
    row.update(exported=True, rc=rc, wall_s=round(time.perf_counter() - started, 1))
    if rc != 0 or not report.exists():
        return {**row, "error": (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1][:300]}
    found = json.loads(report.read_text())
    kinds: dict[str, int] = {}
    for block in found["blocks"]:
        kinds[block["kind"]] = kinds.get(block["kind"], 0) + 1
    return {**row, "kinds": kinds, "unmeasured": sum(1 for b in found["blocks"] if b["saved_fraction"] is None),
            "dropped": len(found["dropped"]), "cut": found["latency"]["cut"],
            "scoring_steps": (found.get("scoring_steps") or {}).get("used", 50),
            "seconds_per_stage": {k: round(v, 1) for k, v in found["seconds_per_stage"].items()}}


def report() -> str:
    lines = ["# Architectures through `optimize` (random weights)", "",
             f"Made by `python -m benchmarks.arch_sweep run` then `report`. Each: exported to ONNX, then "
             f"`graphprune optimize model.onnx {' '.join(OPTIMIZE)}`. Written means onnxruntime ran the file "
             "and it agreed with the optimised graph; the cuts of random weights say nothing about accuracy.", "",
             "| architecture | CPU | written | wall s | candidates by kind | twins unmeasured | dropped | cut | "
             "scoring steps | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ROWS.load(), key=lambda r: r["id"]):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.get("kinds", {}).items()))
        cut = f"{r['cut']:.1%}" if "cut" in r else ""
        lines.append(f"| {r['id']} | {r['cpu']} | {'yes' if 'cut' in r else 'no'} | {r.get('wall_s', '')} | {kinds} | "
                     f"{r.get('unmeasured', '')} | {r.get('dropped', '')} | {cut} | {r.get('scoring_steps', '')} | "
                     f"{r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--archs", help="comma-separated source:name:size (default: the timm list above)")
    parser.add_argument("--redo", action="store_true", help="run rows this CPU has finished again")
    args = parser.parse_args(argv)
    if args.command == "run":
        specs = args.archs.split(",") if args.archs else ARCHS
        done = set() if args.redo else ROWS.done(this_machine())
        with tempfile.TemporaryDirectory(prefix="graphprune-sweep-") as folder:
            for spec in (s for s in specs if s not in done):
                print(f"[{spec}] start {time.strftime('%H:%M:%S')}", flush=True)
                row = run_one(spec, Path(folder))
                ROWS.save(row)
                print(f"[{spec}] {row.get('error') or 'written, cut %.1f%%' % (100 * row['cut'])} "
                      f"({row.get('wall_s', '-')} s)", flush=True)
    (ROWS.path.with_suffix(".md")).write_text(report())


if __name__ == "__main__":
    main()
