"""``graphprune optimize MODEL --latency-cut 0.22 --data TINY -o OUT``: the PRACTISE pipeline.

Each option below that sets a library setting names the field it fills (``fills=``) and takes its
default from it (:mod:`graphprune.cli_options`); ``--config FILE`` takes any option from a TOML or
YAML file (keys: the long option names without dashes; see :mod:`graphprune.cli_config`).
"""

from __future__ import annotations

import json
import operator
from dataclasses import replace
from pathlib import Path

import click

from ..cache import default_cache_dir
from ..cli import load_model_from_args, model_options, output_option
from ..cli_config import config_file, config_option
from ..cli_options import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, SHARE, FloatRange, Names,
                           Numbers, Settings, flags_for, latency_options, subcommand, user_gave)
from ..data import Preprocessing, load_tiny_set
from ..errors import GraphpruneError, UsageError
from ..evaluate import check_eval_data
from ..formats.model_io import atomic_write, check_writable, staged_writes
from ..optimize import (OptimizeConfig, default_pipeline, evaluate_result, image_input_shape, optimize,
                        pipeline_from_names, with_recorded_normalisation, write_result)
from ..passes.recover import MAX_LR
from ..passes.recoverability import ESTIMATORS, OPTIMIZERS
from ..report import format_summary, write_plot
from ..synthesis import METHODS, SynthesisSettings, synthetic_tiny_set

# What one run is configured by: OptimizeConfig (paths without a prefix), the synthesis of a
# data-free tiny set and the images' normalisation. Each option below fills the fields it names.
SETTINGS = Settings(OptimizeConfig, synthesis=SynthesisSettings, preprocessing=Preprocessing)
opt = SETTINGS.option
LEARNING_RATE = FloatRange(f"above 0 and at most {MAX_LR:g}", min=0, max=MAX_LR, min_open=True)  # recover.MAX_LR
# Fields no option sets, deliberately: tuned defaults (documented where they are defined) that
# the Python API can change; tests/test_cli_options.py checks every other field has an option.
INTERNAL = ("holdout_minimum", "latency.warmup_runs", "latency.warmup_s", "latency.min_runs", "latency.max_runs",
            "recoverability.batch_size", "recoverability.momentum", "recoverability.weight_decay",
            "recoverability.ridge", "recoverability.device", "refine.tolerance", "refine.min_gain",
            "recovery.momentum", "recovery.weight_decay", "recovery.clip_grad_norm", "recovery.schedule",
            "recovery.loss", "recovery.trainable", "synthesis.batch_size", "synthesis.lr", "synthesis.class_weight",
            "synthesis.tv_weight", "synthesis.l2_weight",
            # int8 planning: candidates and bounds measured in tests/test_quantize.py; the Python API sets them
            *(f"quantization.{f}" for f in ("formats", "activation_types", "weight_type", "per_channel",
                                            "calibration_method", "max_calibration_images", "batch_size",
                                            "max_top1_drop", "max_disagreement", "max_relative_error",
                                            "max_map50_drop", "max_map_iou_drop", "float_groups", "time_noise",
                                            "error_noise",
                                            "device", "reduce_range", "mimic_steps", "mimic_lr")))
DERIVED = {"cache_dir": "--cache-dir, or none with --no-cache", "preprocessing.size": "the model's input",
           "output_format": "-o's suffix"}


@subcommand("optimize", help="Drop blocks to a measured latency cut and recover on a tiny set.\n\n"
         "Every option can also come from --config FILE (TOML or YAML; keys: the long option names "
         "without dashes, optionally in a table per group: [data], [latency], [recovery], ...).")
@model_options
@config_option
@opt("data", "--data", type=click.Path(exists=True),
     help="folder of images (class sub-folders or a labels.csv optional), labels .csv or .npz (any domain)")
@opt("data", "--data-free", is_flag=True, help="no images: synthesise a tiny set instead")
@opt("data", "--synthetic", fills="synthesis.method", type=click.Choice(["auto", *METHODS]),
     help="with --data-free: bn-inversion (needs BatchNorm) or procedural; auto picks")
@opt("data", "--synthesis-steps", fills="synthesis.steps", type=POSITIVE_INT, help="bn-inversion steps per batch")
@opt("data", "--synthesis-time", fills="synthesis.time_budget_s", type=POSITIVE, metavar="SECONDS",
     help="bn-inversion time budget in seconds")
@opt("data", "--num-samples", fills="synthesis.num_samples", type=POSITIVE_INT, default=None,
     show_default=f"all of --data; {SETTINGS.default('synthesis.num_samples')} with --data-free",
     help="images to draw from --data, or to synthesise")
@opt("data", "--seed", fills=("seed", "recoverability.seed", "recovery.seed", "synthesis.seed", "quantization.seed"),
     type=SEED,
     help="seeds sampling, synthesis, adaptors and recovery")
@opt("data", "--mean", fills="preprocessing.mean", type=Numbers(), help="normalisation mean (comma-separated)")
@opt("data", "--std", fills="preprocessing.std", type=Numbers(), help="normalisation std (comma-separated)")
@opt("data", "--crop", fills="preprocessing.crop", type=SHARE, metavar="FRACTION",
     help="centre crop's share of the resized image: 1.0 resizes the shorter side to the input; "
          "0.875 is ImageNet's evaluation (256 -> 224)")
@opt("data", "--holdout", fills="holdout_fraction", type=FRACTION, help="fraction held out to measure recoverability")
@opt("data", "--eval-data", type=click.Path(exists=True),
     help="folder (class sub-folders or labels.csv optional)/.npz to report how faithful the optimised model is: "
          "top-1 with labels, top-class agreement, a detector's kept and added detections, each output's "
          "relative error")
@opt("latency", "--latency-cut", fills="latency_cut", type=FRACTION, required=True,
     help="fraction of latency to remove, e.g. 0.22")
@opt("latency", "--backend", fills="backend", type=click.Choice(["onnxruntime", "torch"]))
@opt("latency", "--device", fills="latency.device", type=click.Choice(["cpu", "cuda"]),
     help="device the latency is measured on")
@latency_options(SETTINGS, prefix="latency.")
@opt("latency", "--quantize", fills="quantize", type=click.Choice(["none", "auto", "int8"]),
     help="int8 towards the same target: auto where it measures faster within the accuracy bound (off, saying "
          "why, where int8 cannot run; float16 instead on a --device cuda target), int8 always (onnxruntime CPU; "
          "the output is then ONNX)")
@opt("latency", "--quantize-mimic", fills="quantization.mimic", type=click.Choice(["auto", "off"]),
     help="auto: where plain int8 loses more than the bound, train the weights with int8's rounding in the graph "
          "to mimic the original on the tiny set (minutes), and judge again; off: never")
@opt("latency", "--lever", fills="lever", type=click.Choice(["blocks", "resolution", "auto"]),
     help="what is cut: blocks (drop residual blocks, then recover on the tiny set), resolution (the network "
          "runs behind a resize at its entry, the file's input unchanged: the largest internal size measured at "
          "the target, no training; for networks whose outputs do not follow the input's size, such as "
          "classifiers that pool globally), or auto (both; the result closer to the original on the held-out "
          "images is written)")
@opt("latency", "--layers", fills="layers", type=click.Choice(["auto", "always", "never"]),
     help="the plain layers outside the residual blocks (a stride-1 layer that keeps its shape) as candidates "
          "too: auto (where every block dropped falls short of the target), always, or never (the default: "
          "on PP-OCRv4's detector they reached 15% and lost every detection)")
@opt("latency", "--margin", fills="margin", type=NON_NEGATIVE,
     help="select blocks until the measured cut reaches cut+margin")
@opt("latency", "--resolution-margin", fills="resolution_margin", type=NON_NEGATIVE,
     help="the resolution lever's margin: it lands at its goal, not past it by a block, so it needs one above "
          "the timings' noise")
@opt("latency", "--time-budget", fills="time_budget_s", type=POSITIVE, metavar="SECONDS",
     help="seconds the whole run should take (2700: 45 minutes): int8 planning, profiling (past every "
          "distinct block), scoring, refinement and recovery are sized to the time left when they start (default: "
          "no limit)")
@opt("scoring", "--estimator", fills="recoverability.estimator", type=click.Choice(ESTIMATORS),
     help="recoverability estimator")
@opt("scoring", "--score-iterations", fills="recoverability.iterations", type=COUNT,
     help="adaptor training steps per block (estimator practise)")
@opt("scoring", "--score-optimizer", fills="recoverability.optimizer", type=click.Choice(OPTIMIZERS),
     help="adaptor optimiser (sgd: the paper's, momentum 0.9)")
@opt("scoring", "--score-lr", fills="recoverability.lr", type=LEARNING_RATE, help="adaptor learning rate")
@opt("scoring", "--score-precision", fills="recoverability.precision", type=click.Choice(["auto", "float32", "bfloat16"]),
     help="the adaptor fits' forward passes (held-out errors stay float32): bfloat16, float32, or auto: bf16 where "
          "the hardware has it")
@opt("scoring", "--feature-node", fills="feature_node",
     help="nodes whose outputs are mimicked, comma-separated fx or ONNX names (default: the inputs of the "
          "last trained layers behind every output: a classifier's features, a detector's head inputs)")
@opt("refinement", "--refine-evaluations", fills="refine.max_evaluations", type=COUNT,
     help="joint-recoverability fits to refine the chosen set with (0: keep the greedy set)")
@opt("refinement", "--joint-iterations", fills="refine.joint_iterations", type=POSITIVE_INT,
     help="adaptor steps of each joint-recoverability fit")
@opt("refinement", "--refine-seconds", fills="refine.max_seconds", type=POSITIVE,
     help="stop refining once the next joint fit would end past this many seconds (default: no limit)")
@opt("recovery", "--recovery-iterations", fills="recovery.iterations", type=COUNT, help="training steps")
@opt("recovery", "--recovery-lr", fills="recovery.lr", type=LEARNING_RATE, help="learning rate")
@opt("recovery", "--recovery-optimizer", fills="recovery.optimizer", type=click.Choice(OPTIMIZERS),
     help="adam (AdamW) or sgd (with momentum)")
@opt("recovery", "--recovery-batch-size", fills="recovery.batch_size", type=POSITIVE_INT, help="images per step")
@opt("recovery", "--recovery-target", fills="recovery.target", type=click.Choice(["features", "feature-map", "auto"]),
     help="what recovery mimics: the features before the classifier, the map they are pooled from, "
          "or auto: that map where the model has one, else the features")
@opt("recovery", "--augment", fills="recovery.augment",
     type=click.Choice(["auto", "crop-flip", "resized-crop-flip", "resized-crop-flip-mixup", "none"]),
     help="augmentation (auto: by image size)")
@opt("recovery", "--freeze-prefix", fills="recovery.freeze_prefix", type=click.Choice(["auto", "on", "off"]),
     help="leave the network before the first dropped block untrained and run it once for both models "
          "(auto: for images above 64 px)")
@opt("recovery", "--early-stop", fills="recovery.early_stop", type=click.Choice(["auto", "on", "off"]),
     help="train on the tiny set's training part, keep the checkpoint with the lowest held-out feature error, and "
          "stop after 5 of its 10 checkpoints in a row without a new best (auto: for images above 64 px)")
@opt("recovery", "--recovery-seconds", fills="recovery.max_seconds", type=POSITIVE,
     help="fit recovery's schedule into this many seconds (timed on its first steps; default: all its steps)")
@opt("recovery", "--train-precision", fills="recovery.precision", type=click.Choice(["auto", "float32", "bfloat16"]),
     help="recovery's forward passes: bfloat16 autocast, float32, or auto: bf16 where the CPU or GPU has it natively")
@opt("recovery", "--train-device", fills="recovery.device", help="device recovery trains on (cpu, cuda)")
@opt("pipeline", "--passes", type=Names("passes"), metavar="NAMES",
     help="the pipeline's steps by registered name, comma-separated, third-party passes included "
          f"(default: {','.join(step.name for step in default_pipeline(OptimizeConfig()))}; "
          "plan_quantization and quantize_result only where --quantize is not none)")
@output_option(help="output .onnx (or .pt2 for .pt2 input)")
@opt("output", "--report", type=click.Path(dir_okay=False), help="write the JSON report here")
@opt("output", "--plot", type=click.Path(dir_okay=False), help="write a PNG (scores vs latency saved; recovery loss)")
@opt("output", "--cache-dir", type=click.Path(file_okay=False), show_default=str(default_cache_dir()),
     help="resume cache")
@opt("output", "--no-cache", is_flag=True, help="do not read or write the resume cache")
@opt("output", "--quiet", fills="show_progress", to_field=operator.not_, is_flag=True, help="no progress bars")
def command(args) -> int:
    if bool(args.data) == bool(args.data_free):
        raise UsageError("give exactly one of --data or --data-free")
    check_outputs(args)
    ctx = click.get_current_context()
    params = ctx.command.params
    cache_dir = None if args.no_cache else (args.cache_dir or str(default_cache_dir()))
    config = replace(SETTINGS.build(params, args), cache_dir=cache_dir,
                     output_format=Path(args.output).suffix.lower().lstrip("."))
    pipeline = pipeline_from_names(list(args.passes), config) if args.passes else None
    model = load_model_from_args(args)
    prep = with_recorded_normalisation(SETTINGS.build(params, args, "preprocessing", image_input_shape(model)), model,
                                       user_gave("mean", "std"))
    synthetic = None
    if args.data_free:
        synthesis = SETTINGS.build(params, args, "synthesis")
        tiny, synthetic = synthetic_tiny_set(model, synthesis, prep, cache_dir, show_progress=not args.quiet)
    else:
        with flags_for(path="--data"):
            tiny = load_tiny_set(args.data, prep, args.num_samples, args.seed)
    test = None
    if args.eval_data:  # read and checked against the model now: a set it cannot score fails before the run
        with flags_for(path="--eval-data"):
            test = load_tiny_set(args.eval_data, prep)
        check_eval_data(model, test)
    result = optimize(model, tiny, config, pipeline)
    report = result.report
    report["data"]["synthetic"] = synthetic
    report["config_file"] = config_file(ctx)
    if test is not None:
        report["eval"] = evaluate_result(result, model, test)
    with staged_writes():  # the model, the report and the plot appear together, or none does
        if args.plot:
            write_plot(report, Path(args.plot))
        write_result(result, args.output, args.model)
        if args.report:
            text = json.dumps(report, indent=2, default=str)
            atomic_write(Path(args.report), lambda tmp: tmp.write_text(text))
    print(format_summary(report))
    return 0


FLAGS = {"output": "-o", "report": "--report", "plot": "--plot"}


def check_outputs(args) -> None:
    """Fail before any long computation if an output could not be written."""
    for flag in ("output", "report", "plot"):
        value = getattr(args, flag, None)
        if value:
            try:
                check_writable(Path(value))
            except GraphpruneError as exc:
                raise GraphpruneError(f"{FLAGS[flag]}: {exc}") from None
    if getattr(args, "quantize", None) == "int8" and Path(args.output).suffix.lower() == ".pt2":
        raise UsageError(f"--quantize int8 writes ONNX (an int8 model is onnxruntime's): give -o ending in .onnx, "
                         f"got '{args.output}'")
    written = {flag: Path(getattr(args, flag)).resolve() for flag in ("output", "report", "plot")
               if getattr(args, flag, None)}
    if Path(args.model).exists() and Path(args.model).resolve() in written.values():
        raise GraphpruneError("refusing to overwrite the input model; choose another output path")
    if len(set(written.values())) < len(written):
        raise GraphpruneError(f"{', '.join(FLAGS[f] for f in written)} must be different files")
