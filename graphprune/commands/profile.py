"""``graphprune profile MODEL``: the model's latency on a target and, with ``--per-block``, what
dropping each residual block alone would save there; with ``--quantize``, its int8 form against it.

The whole model is timed in rounds until ``--min-runs`` runs and ``--min-time`` seconds are both
reached, after a warm-up; the median is the figure to quote (p10/p90 show the spread). Per-block
savings time each candidate interleaved with the original (see
:mod:`graphprune.passes.measure_latency`), ``--min-time`` seconds for each of the two.

``--quantize auto|int8 --data TINY`` plans int8 as ``optimize`` does (the same pass, checks and
held-out split: :class:`~graphprune.passes.plan_quantization.PlanQuantization`), or takes
``--quant-config LABEL``, quantises the model as ``optimize`` would write it (calibrated on every
tiny image) and times it interleaved with the float model
(:func:`~graphprune.backends.onnxruntime_int8.onnxruntime_cut`): the float and int8 medians, the cut,
the config, the nodes left in float and how close the int8 outputs stay on the tiny images. An
already-quantised ONNX file is timed as it is, on onnxruntime, without reading it into graphprune.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..backends.base import LatencySettings, compare_interleaved, get_backend
from ..cli import load_model_from_args, model_options
from ..cli_options import (POSITIVE_INT, SEED, SHARE, GroupedOption, IntRange, Numbers, Settings, flags_for,
                           latency_options, subcommand, user_gave)
from ..data import Preprocessing
from ..errors import GraphpruneError, UsageError
from ..optimize import OptimizeConfig
from ..passes import FindBlocks, measure_block_latency

SETTINGS = Settings(LatencySettings, preprocessing=Preprocessing)
# profile times one model (or each block against it) once, for a figure to quote, so it spends twice
# what optimize spends on each of the dozens of candidates it measures while selecting.
MIN_TIME_S = 2 * SETTINGS.default("min_time_s")
# a measurement stops at max_runs (not an option), so more could never be reached: refused as a
# flag, not as the library's "need 1 <= min_runs <= max_runs" naming two fields the user cannot see
MIN_RUNS = IntRange(f"an integer from 1 to {SETTINGS.default('max_runs')}", min=1, max=SETTINGS.default("max_runs"))


@subcommand("profile", help="Measure latency on a target, optionally what each block costs or what int8 cuts.")
@model_options
@click.option("--backend", cls=GroupedOption, group="latency", default=OptimizeConfig.backend, show_default=True,
              help="onnxruntime or torch")
@SETTINGS.option("latency", "--device", fills="device", help="cpu or cuda")
@latency_options(SETTINGS, prefix="", min_time=MIN_TIME_S)
@SETTINGS.option("latency", "--min-runs", fills="min_runs", type=MIN_RUNS, metavar="N",
                 help="and at least this many runs")
@click.option("--per-block", cls=GroupedOption, group="latency", is_flag=True,
              help="also measure what dropping each block saves")
@click.option("--quantize", cls=GroupedOption, group="latency", type=click.Choice(["none", "auto", "int8"]),
              default="none", show_default=True,
              help="time the model quantised to int8 against its float form, planned as optimize plans it "
                   "(auto: none where no candidate pays; int8: the fastest); onnxruntime CPU, needs --data")
@click.option("--quant-config", cls=GroupedOption, group="latency", metavar="LABEL",
              help="quantise with this config instead of planning: a plan's label, e.g. qdq-u8s8 or "
                   "qoperator-s8s8-7bit+float:first_conv (implies --quantize int8), or fp16 (float16, for a --device "
                   "cuda target)")
@click.option("--data", cls=GroupedOption, group="data", type=click.Path(exists=True),
              help="with --quantize: images (folder or .npz) to calibrate on and to compare outputs on")
@click.option("--num-samples", cls=GroupedOption, group="data", type=POSITIVE_INT, metavar="N",
              help="images to draw from --data (default: all)")
@click.option("--seed", cls=GroupedOption, group="data", type=SEED, default=OptimizeConfig.seed, show_default=True,
              help="seeds sampling, the held-out split and the plan, as optimize's --seed")
@SETTINGS.option("data", "--mean", fills="preprocessing.mean", type=Numbers(), help="normalisation mean (comma-separated)")
@SETTINGS.option("data", "--std", fills="preprocessing.std", type=Numbers(), help="normalisation std (comma-separated)")
@SETTINGS.option("data", "--crop", fills="preprocessing.crop", type=SHARE, metavar="FRACTION",
                 help="centre crop's share of the resized image: 1.0 resizes the shorter side to the input; "
                      "0.875 is ImageNet's evaluation (256 -> 224)")
@click.option("--json", cls=GroupedOption, group="output", is_flag=True, help="print JSON to stdout")
@click.option("--no-progress", cls=GroupedOption, group="output", is_flag=True,
              help="no progress bar (it is shown only on a terminal)")
def command(args) -> int:
    mode, given = _quantize_mode(args)
    backend = get_backend(args.backend)
    settings = SETTINGS.build(click.get_current_context().command.params, args)
    progress = False if args.no_progress else None
    int8_file = _read_int8_file(args.model)
    if int8_file is not None:
        return _profile_int8_file(args, int8_file, backend, settings, mode, progress)
    model = load_model_from_args(args)
    if mode != "none":
        return _profile_quantized(args, model, mode, given, settings)
    if args.per_block:
        blocks = FindBlocks()(model).value
        table = measure_block_latency(backend, model, settings, blocks, progress=progress)
        original, rows, info = table.original, table.rows, table.backend_info
    else:
        original = _measure_whole(backend.prepare(model, settings), settings, progress)
        rows, info = [], backend.describe(settings)
    _print_latency(args, settings, original, rows, info)
    return 0


def _quantize_mode(args):
    """(mode, the ``--quant-config`` given or None): ``--quant-config`` means int8; combinations that
    make no sense are refused before anything is read."""
    from ..passes.quantize import QuantConfig

    if args.quant_config and args.quantize == "auto":
        raise UsageError("--quant-config fixes the quantisation and --quantize auto would plan one: give one of them")
    mode = "int8" if args.quant_config else args.quantize
    if mode != "none" and not args.data:
        raise UsageError("--quantize needs --data: images to calibrate the int8 model on and to compare it on")
    if mode != "none" and args.per_block:
        raise UsageError("--per-block times float blocks; give it or --quantize, not both")
    with flags_for(label="--quant-config"):
        return mode, QuantConfig.from_label(args.quant_config) if args.quant_config else None


def _read_int8_file(source: str):
    """The file's ``ModelProto`` where MODEL is an already-quantised ONNX file, else None."""
    if Path(source).suffix.lower() != ".onnx" or not Path(source).is_file():
        return None
    from ..formats.onnx_read import check_onnx, read_onnx
    from ..passes.quantize import is_quantized

    proto = read_onnx(source)
    if not is_quantized(proto):
        return None  # load reads and checks it as any model
    check_onnx(proto, source)
    return proto


def _profile_int8_file(args, proto, backend, settings: LatencySettings, mode: str, progress) -> int:
    """An int8 file timed as it is: graphprune cannot read its blocks, nor quantise it again."""
    if mode != "none" or args.per_block:
        raise GraphpruneError(f"{args.model} is already quantised: --quantize and --per-block take its float original")
    if backend.name != "onnxruntime":
        raise GraphpruneError(f"{args.model} is an int8 ONNX file, which graphprune times on onnxruntime only: "
                              "use --backend onnxruntime", parameter="backend")
    from ..backends.onnxruntime import file_runner

    run_once = file_runner(proto, settings, args.input_shape, "the int8 model")
    _print_latency(args, settings, _measure_whole(run_once, settings, progress), [], backend.describe(settings),
                   int8_file=True)
    return 0


def _measure_whole(run_once, settings: LatencySettings, progress: bool | None):
    """One prepared model alone: the same rounds as an interleaved run of one model, with a progress bar."""
    from tqdm import tqdm

    with tqdm(desc="measuring", unit="run", file=sys.stderr, leave=False,
              disable=None if progress is None else not progress) as bar:
        return compare_interleaved([run_once], settings, on_round=lambda _: bar.update())[0]


def _print_latency(args, settings: LatencySettings, original, rows, info: dict, int8_file: bool = False) -> None:
    if args.json:
        doc = {"model": args.model, "latency_ms": original.to_dict(),
               "blocks": [{"name": r.name, "saved_ms": r.saved_ms, "saved_fraction": r.saved_fraction} for r in rows],
               "settings": {**settings.to_dict(), **info}}
        print(json.dumps({**doc, "int8_file": True} if int8_file else doc, indent=2))
        return
    text = format_profile(args.model, original, rows, info, per_block=args.per_block)
    print(text + ("\nan int8 ONNX file, timed as it is" if int8_file else ""))


def _profile_quantized(args, model, mode: str, given, settings: LatencySettings) -> int:
    """``--quantize``: plan (or take ``--quant-config``), quantise as optimize writes, time against the float model."""
    from ..backends.onnxruntime_int8 import onnxruntime_cut
    from ..data import load_tiny_set
    from ..formats.model_io import to_onnx
    from ..optimize import image_input_shape, make_context, with_recorded_normalisation
    from ..passes.plan_quantization import PlanQuantization, check_int8_run
    from ..passes.quantize_result import quantize_model
    from ..passes.quantize import QuantizeSettings

    params = click.get_current_context().command.params
    prep = with_recorded_normalisation(SETTINGS.build(params, args, "preprocessing", image_input_shape(model)), model,
                                       user_gave("mean", "std"))
    with flags_for(path="--data", num_samples="--num-samples"):
        tiny = load_tiny_set(args.data, prep, args.num_samples, args.seed)
    config = OptimizeConfig(backend=args.backend, latency=settings, quantize=mode, seed=args.seed,
                            quantization=QuantizeSettings(seed=args.seed), show_progress=False)
    ctx = make_context(model, tiny, config)
    planner = PlanQuantization(mode, config.quantization)
    if given is not None:
        check_int8_run(ctx, "profile", half=given.is_half)
    else:
        planner.check(model, ctx)
    float_proto = to_onnx(model)
    plan = None if given is not None else planner.plan(ctx, float_proto)
    doc = {"model": args.model, "quantization": {"mode": mode, "given": args.quant_config,
                                                 "plan": plan.to_dict() if plan else None}}
    chosen = given if plan is None else plan.config
    if chosen is not None:
        quantized = quantize_model(model, model, tiny.images, chosen, settings.device,
                                   plan.reason if plan else f"{args.quant_config}: given",
                                   config.quantization.mimic_settings())
        timing = onnxruntime_cut(float_proto, tiny.images, settings)(quantized.proto)
        doc.update(float_ms=timing.float_ms, int8_ms=timing.quantized_ms, cut=timing.cut)
        doc["quantization"].update(used=True, reason=quantized.reason, config=quantized.info["config"],
                                   float_nodes=quantized.float_nodes, opset=quantized.info.get("opset"),
                                   notes=quantized.info.get("notes"), calibration_images=len(tiny),
                                   against_float_on_tiny_set=quantized.agreement)
    else:
        doc["quantization"].update(used=False, reason=f"not quantised: {plan.reason}")
    doc["settings"] = {**settings.to_dict(), **ctx.backend.describe(settings)}
    print(json.dumps(doc, indent=2) if args.json else format_quantized(doc))
    return 0


def format_quantized(doc: dict) -> str:
    """The text form of ``profile --quantize``'s JSON document."""
    section = doc["quantization"]
    lines = [_where(doc["model"], doc["settings"])]
    plan = section["plan"]
    if plan is not None:
        lines.append(f"int8 plan ({section['mode']}): {len(plan['candidates'])} candidates measured, "
                     f"accuracy bound {plan['metric']} {plan['bound']}")
        for c in plan["candidates"]:
            timing = "failed: " + c["error"] if c["error"] else f"cut {100 * c['timing']['cut']:+.1f}%"
            accuracy = "" if c["error"] else "  " + ", ".join(
                f"{name} {100 * c[key]:.1f}%" for name, key in (("agreement", "agreement"), ("top-1", "top1"),
                                                                 ("map IoU", "map_iou"),
                                                                 ("relative error", "relative_error"))
                if c[key] is not None) + ("" if c["within_bound"] else "  (over the bound)")
            lines.append(f"  {c['config']['label']:<40} {timing}{accuracy}")
    if not section["used"]:
        return "\n".join(lines + [section["reason"]])
    config, agreement = section["config"], section["against_float_on_tiny_set"]
    lines.append(f"chosen: {config['label']} ({config['fmt']} format, {config['activations']} activations, "
                 f"{config['weights']} weights{', per channel' if config['per_channel'] else ''}): {section['reason']}")
    floats = section["float_nodes"]
    lines.append(f"left in float: {', '.join(floats) if floats else 'no node'}")
    lines.append(f"latency: float {doc['float_ms']:.3f} ms, int8 {doc['int8_ms']:.3f} ms: cut {100 * doc['cut']:.1f}% "
                 "(medians, timed interleaved)")
    close = f"relative error {100 * agreement['relative_error']:.2f}%"
    if "top1_agreement" in agreement:
        close = f"top-1 agreement {100 * agreement['top1_agreement']:.1f}%, " + close
    lines.append(f"int8 against float on {agreement['images']} tiny images: {close}")
    return "\n".join(lines)


def _where(model_name: str, info: dict) -> str:
    """``MODEL: onnxruntime on cpu (CPUExecutionProvider), 1 thread, batch 1``."""
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    where = f"{info['backend']} on {info['device']}"
    if info.get("providers"):
        where += f" ({', '.join(info['providers'])})"
    return f"{model_name}: {where}, {threads}, batch {info['batch_size']}"


def format_profile(model_name: str, original, rows, info: dict, per_block: bool) -> str:
    lines = [_where(model_name, info),
             f"latency: median {original.median_ms:.3f} ms (p10 {original.p10_ms:.3f}, p90 {original.p90_ms:.3f}, "
             f"{original.runs} runs)"]
    if not per_block:
        return "\n".join(lines)
    if not rows:
        return "\n".join(lines + ["no residual blocks found (nothing graphprune can drop)"])
    table = [("block", "saved ms", "saved %", "without it ms")]
    table += [(r.name, f"{r.saved_ms:.3f}", f"{100 * r.saved_fraction:.1f}", f"{r.candidate_ms:.3f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    body = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in table]
    body.insert(1, "  ".join("-" * w for w in widths))
    total = 100 * sum(r.saved_fraction for r in rows)
    body.append(f"{len(rows)} blocks, each dropped alone and timed interleaved with the original; "
                f"single-block savings sum to {total:.1f}% (they do not add up exactly)")
    return "\n".join(lines + [""] + body)
