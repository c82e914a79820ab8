"""``graphprune optimize MODEL --latency-cut 0.22 --data TINY -o OUT``: the PRACTISE pipeline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..backends.base import LatencySettings
from ..cache import default_cache_dir
from ..cli import add_model_arguments, load_model_from_args
from ..data import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, load_tiny_set
from ..errors import GraphpruneError, UsageError
from ..evaluate import evaluate
from ..formats.model_io import atomic_write, save
from ..optimize import OptimizeConfig, image_input_shape, optimize
from ..passes.recover import RecoverySettings
from ..passes.recoverability import ESTIMATORS, OPTIMIZERS, RecoverabilitySettings
from ..passes.refine_selection import RefineSettings
from ..report import format_summary, write_plot
from ..synthesis import SynthesisSettings, synthetic_tiny_set


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="drop blocks to a measured latency cut and recover on a tiny set")
    add_model_arguments(p)
    p.add_argument("--latency-cut", type=float, required=True, help="fraction of latency to remove, e.g. 0.22")
    p.add_argument("--data", help="folder of images (class sub-folders optional) or .npz (any domain)")
    p.add_argument("--data-free", action="store_true", help="no images: synthesise a tiny set instead")
    p.add_argument("--synthetic", default="auto", choices=["auto", "bn-inversion", "procedural"],
                   help="with --data-free: bn-inversion (needs BatchNorm) or procedural; auto picks")
    p.add_argument("--synthesis-steps", type=int, default=400, help="bn-inversion steps per batch of 64")
    p.add_argument("--synthesis-time", type=float, help="bn-inversion time budget in seconds")
    p.add_argument("-o", "--output", required=True, help="output .onnx (or .pt2 for .pt2 input)")
    p.add_argument("--num-samples", type=int, help="images to draw from --data (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean", default=",".join(map(str, IMAGENET_MEAN)), help="normalisation mean (comma-separated)")
    p.add_argument("--std", default=",".join(map(str, IMAGENET_STD)), help="normalisation std (comma-separated)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out to measure recoverability")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=1, help="batch size the latency is measured at")
    p.add_argument("--threads", type=int, default=1, help="CPU threads the latency is measured with")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per latency measurement (per model)")
    p.add_argument("--margin", type=float, default=0.005, help="select until the measured cut reaches cut+margin")
    p.add_argument("--feature-node", help="node whose output is mimicked (default: input of the classifier)")
    scoring, recovery = RecoverabilitySettings(), RecoverySettings()
    p.add_argument("--estimator", default=scoring.estimator, choices=ESTIMATORS, help="recoverability estimator")
    p.add_argument("--score-iterations", type=int, default=scoring.iterations,
                   help="adaptor training steps per block (estimator practise)")
    p.add_argument("--score-optimizer", default=scoring.optimizer, choices=OPTIMIZERS,
                   help="adaptor optimiser (sgd: the paper's, momentum 0.9)")
    p.add_argument("--score-lr", type=float, default=scoring.lr, help="adaptor learning rate")
    p.add_argument("--refine-evaluations", type=int, default=RefineSettings().max_evaluations,
                   help="joint-recoverability fits to refine the chosen set with (0: keep the greedy set)")
    p.add_argument("--joint-iterations", type=int, default=RefineSettings().joint_iterations,
                   help="adaptor steps of each joint-recoverability fit")
    p.add_argument("--recovery-iterations", type=int, default=recovery.iterations)
    p.add_argument("--recovery-lr", type=float, default=recovery.lr)
    p.add_argument("--recovery-optimizer", default=recovery.optimizer, choices=["adam", "sgd"])
    p.add_argument("--recovery-batch-size", type=int, default=recovery.batch_size)
    p.add_argument("--recovery-target", default=recovery.target, choices=["features", "feature-map", "auto"],
                   help="what recovery mimics: the features before the classifier, the map they are pooled from, "
                        "or auto: that map where the model has one, else the features")
    p.add_argument("--augment", default="auto", choices=["auto", "crop-flip", "resized-crop-flip", "none"])
    p.add_argument("--train-device", default="cpu", help="device recovery trains on (cpu, cuda)")
    p.add_argument("--eval-data", help="labelled folder/.npz to report top-1 of original and optimised")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", help="write a PNG (scores vs latency saved; recovery loss)")
    p.add_argument("--cache-dir", default=None, help=f"resume cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the resume cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got '{text}'") from None


def check_outputs(args) -> None:
    """Fail before any long computation if an output could not be written."""
    for flag in ("output", "report", "plot"):
        value = getattr(args, flag, None)
        if value and not Path(value).parent.is_dir():
            raise GraphpruneError(f"output folder does not exist: {Path(value).parent}")
    if Path(args.output).suffix.lower() not in (".onnx", ".pt2"):
        raise UsageError(f"-o must end in .onnx or .pt2, got '{args.output}'")
    if Path(args.model).exists() and Path(args.output).resolve() == Path(args.model).resolve():
        raise GraphpruneError("refusing to overwrite the input model; choose another output path")


def run(args) -> int:
    if bool(args.data) == bool(args.data_free):
        raise UsageError("give exactly one of --data or --data-free")
    if not 0 < args.latency_cut < 1:
        raise UsageError(f"--latency-cut must be between 0 and 1 (exclusive), got {args.latency_cut}")
    for flag in ("batch_size", "threads", "recovery_batch_size", "score_lr"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.refine_evaluations < 0:
        raise UsageError("--refine-evaluations must be 0 or more")
    if args.joint_iterations < 1:
        raise UsageError("--joint-iterations must be at least 1")
    check_outputs(args)
    model = load_model_from_args(args)
    shape = image_input_shape(model)
    prep = Preprocessing(shape, _floats(args.mean, "--mean"), _floats(args.std, "--std"))
    cache_dir = None if args.no_cache else (args.cache_dir or str(default_cache_dir()))
    synthetic = None
    if args.data_free:
        settings = SynthesisSettings(method=args.synthetic, num_samples=args.num_samples or 256, seed=args.seed,
                                     steps=args.synthesis_steps, time_budget_s=args.synthesis_time)
        tiny, synthetic = synthetic_tiny_set(model, settings, prep, cache_dir, show_progress=not args.quiet)
    else:
        tiny = load_tiny_set(args.data, prep, args.num_samples, args.seed)
    config = OptimizeConfig(
        latency_cut=args.latency_cut, backend=args.backend,
        latency=LatencySettings(batch_size=args.batch_size, threads=args.threads, device=args.device,
                                min_time_s=args.min_time),
        margin=args.margin, holdout_fraction=args.holdout, seed=args.seed, feature_node=args.feature_node,
        recoverability=replace(RecoverabilitySettings(), estimator=args.estimator, iterations=args.score_iterations,
                               optimizer=args.score_optimizer, lr=args.score_lr, seed=args.seed),
        refine=RefineSettings(max_evaluations=args.refine_evaluations, joint_iterations=args.joint_iterations),
        recovery=RecoverySettings(iterations=args.recovery_iterations, lr=args.recovery_lr,
                                  optimizer=args.recovery_optimizer, batch_size=args.recovery_batch_size,
                                  target=args.recovery_target,
                                  augment=args.augment, seed=args.seed, device=args.train_device),
        cache_dir=cache_dir,
        show_progress=not args.quiet,
    )
    result = optimize(model, tiny, config)
    report = result.report
    report["data"]["synthetic"] = synthetic
    if args.eval_data:
        test = load_tiny_set(args.eval_data, prep)
        report["eval"] = {"original": evaluate(model, test), "optimized": evaluate(result.model, test, model)}
    save(result.model, args.output, source_path=args.model)
    report["output"] = str(args.output)
    if args.report:
        text = json.dumps(report, indent=2, default=str)
        atomic_write(Path(args.report), lambda tmp: tmp.write_text(text))
    if args.plot:
        write_plot(report, Path(args.plot))
    print(format_summary(report))
    return 0
