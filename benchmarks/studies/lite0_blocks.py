"""Which EfficientNet-Lite0 blocks can go at 22%, and which label-free signal on the tiny set says so?

Recovery on 160 photos did not lift the four blocks graphprune dropped at 22% (``lite0_recovery``:
78.9 unrecovered, no variant past 79.0; the original 85.1 at crop 1.0). So either another block set
of the same latency loses less, or nothing does and the 2-point goal needs more than block dropping.
This study drops block sets *without any recovery* and scores each:

* ``top1`` on the 800 photos of ``imagenet-eval`` (the truth the product cannot see);
* on the 200 tiny photos (what the product can see, no labels): the logits' relative error
  ||y - y0|| / ||y0||, the mean KL(softmax(y0) || softmax(y)), and top-class agreement with the original.

First every block alone, then the block sets that reach the cut (their blocks' latency fractions,
measured by the 22% row of ``real_models.json``, summed) ranked by the sum of their single-block
top-1 losses (the cheapest under additivity), plus the set graphprune chose (the 22% row) and
Block Influence's (``_influence_set``).
Which result changes what: a set within 2 points unrecovered means selection is the lever (and the
signal that ranks it first on the tiny set is the one scoring should use); none within 2 means the
goal needs recovery that generalises from 160 photos, or int8 (``--quantize auto``) at this cut.

    python -m benchmarks.studies.lite0_blocks run [--sets 12]
    python -m benchmarks.studies.lite0_blocks report   # -> benchmarks/studies/results/lite0_blocks.md
    python -m benchmarks.studies.lite0_blocks recalibrate _blocks.4,_blocks.7,_blocks.9,_blocks.10   # or gapfit BLOCKS
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from benchmarks.studies.base import study_results_dir

NAME = "lite0_blocks"
CUT = 0.22
CHOSEN = {"graphprune": ("_blocks.4", "_blocks.7", "_blocks.9", "_blocks.10")}


def _latency_fractions() -> dict[str, float]:
    """Each block's measured latency saving, from the first Lite0 graphprune row (seed 2021, crop 1.0:
    the crop changes the pixels, not the latency)."""
    from benchmarks.common import results_dir

    rows = json.loads((results_dir() / "real_models.json").read_text())
    row = next(r for r in rows if r["model"] == "efficientnet_lite0" and r["method"] == "graphprune")
    return {b["name"]: b["saved_fraction"] for b in row["blocks"]}


def _logits(model, data) -> torch.Tensor:
    from graphprune.model import first_tensor

    gm = model.graph_module.eval()
    with torch.no_grad():
        return torch.cat([first_tensor(gm(data.images[i:i + 50])) for i in range(0, len(data), 50)])


def _signals(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    from graphprune.fidelity import class_kl

    return {"relative_error": float((logits - reference).norm() / reference.norm()), "kl": class_kl(logits, reference),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean())}


def run(sets: int) -> None:
    import graphprune as gp
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.passes import find_blocks

    spec = MODELS["efficientnet_lite0"]
    original = gp.load(str(spec.path()))
    blocks = find_blocks(original)
    tiny, test = tiny_set(spec), eval_set(spec)
    tiny_ref, test_ref = _logits(original, tiny), _logits(original, test)
    labels = test.labels
    top1_original = float((test_ref.argmax(1) == labels).float().mean())
    fractions = _latency_fractions()
    out = study_results_dir() / f"{NAME}.jsonl"
    done = {tuple(json.loads(line)["blocks"]) for line in out.read_text().splitlines()} if out.exists() else set()

    def score(names: tuple[str, ...], why: str) -> dict | None:
        names = tuple(sorted(names, key=lambda n: int(n.split(".")[-1])))
        if names in done:
            return None
        start = time.time()
        pruned = gp.drop_blocks(original, list(names), blocks)
        test_out = _logits(pruned, test)
        row = {"blocks": list(names), "why": why, "saved_fraction": round(sum(fractions[n] for n in names), 4),
               "top1": float((test_out.argmax(1) == labels).float().mean()), "top1_original": top1_original,
               "crop": spec.crop, "tiny": _signals(_logits(pruned, tiny), tiny_ref),
               "seconds": round(time.time() - start, 1)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(names)
        print(json.dumps(row), flush=True)
        return row

    for name in fractions:
        score((name,), "single")
    singles = {tuple(r["blocks"])[0]: r for r in _rows() if len(r["blocks"]) == 1}
    loss = {n: top1_original - singles[n]["top1"] for n in fractions}
    reaching = [c for k in range(1, len(fractions) + 1) for c in itertools.combinations(sorted(fractions), k)
                if sum(fractions[n] for n in c) >= CUT + 0.005
                and all(sum(fractions[n] for n in c if n != m) < CUT + 0.005 for m in c)]  # minimal sets
    for names, _ in zip(sorted(reaching, key=lambda c: sum(loss[n] for n in c)), range(sets)):
        score(names, "additive rank")
    for method, names in CHOSEN.items():
        score(names, method)
    score(_influence_set(original, blocks, tiny, fractions), "block-influence")


def _influence_set(original, blocks, tiny, fractions: dict[str, float]) -> tuple[str, ...]:
    """Block Influence's choice (``estimator="influence"`` on the training split, as ``optimize``
    splits the tiny set): blocks in order of influence per latency saved, added until their single
    savings sum to the target plus the margin, then any block the others no longer need dropped
    (select_blocks measures these sums; here they are the 22% row's single-block fractions)."""
    from graphprune.data import split_holdout
    from graphprune.passes.recoverability import RecoverabilitySettings, score_blocks

    train, holdout = split_holdout(tiny, 0.2, 16, 2021)
    scores = score_blocks(original, blocks, train, holdout, RecoverabilitySettings(estimator="influence"),
                          show_progress=False)
    chosen: list[str] = []
    for s in sorted(scores, key=lambda s: s.recoverability / fractions[s.name]):
        if sum(fractions[n] for n in chosen) >= CUT + 0.005:
            break
        chosen.append(s.name)
    for name in list(reversed(chosen[:-1])):
        if sum(fractions[n] for n in chosen if n != name) >= CUT + 0.005:
            chosen.remove(name)
    return tuple(chosen)


def gapfit(names: list[str], ridges: list[float]) -> None:
    """Recovery without training: at each gap, in graph order, one adaptor solved in closed form
    (ridge least squares over every position of the 160 training photos, as ``optimize`` splits
    them; one per run of consecutive dropped blocks) from what now arrives there (earlier gaps' adaptors in) to the original block's output.
    The adaptors stay in the graph (not folded): this measures only whether the fit helps top-1."""
    import graphprune as gp
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.adaptors import channel_dim, insert_adaptor
    from graphprune.data import split_holdout
    from graphprune.features import run_batched, truncate
    from graphprune.passes import find_blocks
    from graphprune.passes.adaptor_fit import current_input, node_named, redirect, ridge_map

    spec = MODELS["efficientnet_lite0"]
    original = gp.load(str(spec.path()))
    blocks = find_blocks(original)
    train, holdout = split_holdout(tiny_set(spec), 0.2, 16, 2021)
    test = eval_set(spec)
    ref = _logits(original, holdout)
    ogm = original.graph_module
    for ridge in ridges:
        start = time.time()
        pruned = gp.drop_blocks(original, names, blocks)
        gm = pruned.graph_module
        for i, block in enumerate(b for b in blocks if b.name in names):
            nodes = {n.name: n for n in gm.graph.nodes}
            readers = [nodes[u.name] for u in node_named(ogm, block.exit).users if u.name in nodes]
            if not readers:  # the next block is dropped too: one adaptor at the end of the run
                continue
            value = current_input(ogm, gm, block.exit, readers[0].name)
            x = run_batched(truncate(gm, value.name), train.images)
            y = run_batched(truncate(ogm, block.exit), train.images)
            dim = channel_dim(node_named(ogm, block.exit), ogm, tuple(y.shape))
            adaptor = insert_adaptor(gm, value, [], y.shape[dim], dim, f"gap_adaptor_{i}")
            for reader in readers:
                redirect(ogm, reader, block.exit, adaptor)
            gm.get_submodule(str(adaptor.target)).weight.data.copy_(ridge_map(x, y, dim, ridge))
            gm.recompile()
        test_out = _logits(pruned, test)
        row = {"blocks": names, "why": f"gap lstsq ridge {ridge}", "top1": float((test_out.argmax(1) == test.labels)
               .float().mean()), "holdout": _signals(_logits(pruned, holdout), ref), "seconds": round(time.time() - start)}
        with (study_results_dir() / f"{NAME}_gapfit.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def recalibrate(names: list[str]) -> None:
    """Recovery without training, the other way: PRACTISE's recovery runs BatchNorm in train mode,
    which re-estimates every BatchNorm's statistics on the pruned network. On a folded graph (every
    ONNX export) the same is a per-channel affine after each conv, y -> s * y + t, so that over the
    160 training photos each channel's mean and standard deviation equal the original's at that
    conv (BatchNorm's output had the original's statistics' gamma and beta). Solved in graph order
    in one batched pass (each conv's correction applied before the next conv's statistics are
    read) and folded into the conv's weight and bias."""
    import graphprune as gp
    from benchmarks.real_models import MODELS, eval_set, tiny_set
    from graphprune.data import split_holdout
    from graphprune.passes import find_blocks

    spec = MODELS["efficientnet_lite0"]
    original = gp.load(str(spec.path()))
    train, holdout = split_holdout(tiny_set(spec), 0.2, 16, 2021)
    test = eval_set(spec)
    start = time.time()
    pruned = gp.drop_blocks(original, names, find_blocks(original))
    ogm, gm = original.graph_module.eval(), pruned.graph_module.eval()
    shared = {n.target for n in ogm.graph.nodes if n.op == "call_module"}
    convs = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in shared
             and isinstance(gm.get_submodule(n.target), torch.nn.Conv2d)]

    def channel_stats(out: torch.Tensor):
        out = out.double()
        return out.mean((0, 2, 3)), out.std((0, 2, 3))

    wanted, hooks = {}, []
    for name in convs:
        hooks.append(ogm.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: wanted.__setitem__(name, channel_stats(out))))
    with torch.no_grad():
        ogm(train.images)
    for hook in hooks:
        hook.remove()
    corrections, hooks = {}, []

    def correct(name, out):
        mean, std = channel_stats(out)
        scale = torch.where(std > 1e-8, wanted[name][1] / std.clamp_min(1e-8), torch.ones_like(std))
        corrections[name] = scale.float(), (wanted[name][0] - scale * mean).float()
        return out * corrections[name][0].view(1, -1, 1, 1) + corrections[name][1].view(1, -1, 1, 1)
    for name in convs:
        hooks.append(gm.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: correct(name, out)))
    with torch.no_grad():
        gm(train.images)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, (scale, shift) in corrections.items():
            conv = gm.get_submodule(name)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
            conv.bias = torch.nn.Parameter(bias * scale + shift)
    test_out = _logits(pruned, test)
    row = {"blocks": names, "why": f"statistics recalibration of {len(corrections)} convs (mean, std)",
           "top1": float((test_out.argmax(1) == test.labels).float().mean()),
           "holdout": _signals(_logits(pruned, holdout), _logits(original, holdout)), "seconds": round(time.time() - start)}
    with (study_results_dir() / f"{NAME}_gapfit.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _rows(name: str = NAME) -> list[dict]:
    path = study_results_dir() / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def report() -> None:
    rows = _rows()
    lines = [f"# {__doc__.splitlines()[0]}", "", "Made by `python -m benchmarks.studies.lite0_blocks run`; no "
             f"recovery; crop {rows[0]['crop']}; original top-1 {100 * rows[0]['top1_original']:.2f} on the 800 "
             "imagenet-eval photos; tiny-set signals on the 200 imagenet-samples photos against the original.", "",
             "| blocks | why | latency saved | top-1 eval | tiny: relative error | tiny: KL | tiny: agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (len(r["blocks"]) > 1, -r["top1"])):
        t = r["tiny"]
        why = next((m for m, names in CHOSEN.items() if list(names) == r["blocks"]), r["why"])
        lines.append(f"| {', '.join(r['blocks'])} | {why} | {100 * r['saved_fraction']:.1f}% | "
                     f"{100 * r['top1']:.2f} | {t['relative_error']:.3f} | {t['kl']:.4f} | {100 * t['agreement']:.1f} |")
    multi = [r for r in rows if len(r["blocks"]) > 1]
    if multi:
        best = max(multi, key=lambda r: r["top1"])
        lines += ["", f"Best of the {len(multi)} sets that reach the cut, unrecovered: {', '.join(best['blocks'])}, "
                  f"top-1 {100 * best['top1']:.2f}, {100 * (best['top1_original'] - best['top1']):.2f} points below "
                  "the original."]
    if len(multi) >= 3:
        lines += ["", "Spearman rank correlation with eval top-1 over the block sets that reach the cut "
                  f"({len(multi)} sets; a good signal is strongly negative for error and KL, positive for agreement):", ""]
        for key in ("relative_error", "kl", "agreement"):
            lines.append(f"- {key}: {_spearman([r['tiny'][key] for r in multi], [r['top1'] for r in multi]):+.2f}")
    fitted = _rows(f"{NAME}_gapfit")
    if fitted:
        lines += ["", "Closed-form gap adaptors (`gapfit`) and statistics recalibration (`recalibrate`), no training; "
                  "top-1 on the 800 photos against the same set unrecovered above:", "", "| blocks | fit | top-1 eval | held-out KL | held-out agreement |",
                  "|---|---|---|---|---|"]
        lines += [f"| {', '.join(r['blocks'])} | {r['why']} | {100 * r['top1']:.2f} | {r['holdout']['kl']:.4f} | "
                  f"{100 * r['holdout']['agreement']:.1f} |" for r in fitted]
    (study_results_dir() / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("--sets", type=int, default=12, help="block sets past the single blocks")
    fit = sub.add_parser("gapfit")
    fit.add_argument("blocks", help="comma-separated block names")
    fit.add_argument("--ridges", default="0.001", help="comma-separated ridge strengths")
    sub.add_parser("recalibrate").add_argument("blocks", help="comma-separated block names")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.sets)
    elif args.command == "recalibrate":
        recalibrate(args.blocks.split(","))
    elif args.command == "gapfit":
        gapfit(args.blocks.split(","), [float(r) for r in args.ridges.split(",")])
    else:
        report()


if __name__ == "__main__":
    main()
