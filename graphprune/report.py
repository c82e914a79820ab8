"""Human-readable output of ``optimize``: the summary table and the PNG plot."""

from __future__ import annotations

from pathlib import Path

from .formats.model_io import atomic_write

GIVEN_FILE_NOISE = 0.05  # the file as given is said to differ where its time differs by more (interleaved noise: a few %)
# A written model's measured cut this far below the target is said in a warning line: interleaved
# re-timings of one file moved by up to a point on an idle machine (ResNet-56: 22.5, 22.1, 21.4%).
SHORTFALL_NOISE = 0.02
# A run's steps taking this much more than its --time-budget are said in a warning line: the stages
# size themselves to their shares of what is left, but not below their least work (every distinct
# block timed once, every block scored once without adaptors): MaxViT-T at 224 px, 55 blocks, took
# 368 s of a 300 s budget in profile_blocks (119 s) and score_recoverability (148 s).
BUDGET_SLACK = 0.1


def format_summary(report: dict) -> str:
    latency = report["latency"]
    resolution = report.get("resolution")
    lines = _resolution_lines(resolution) if resolution else _block_lines(report)
    lever = report.get("lever") or {}
    if lever.get("candidates"):  # lever "auto": both were tried
        took = ", ".join(f"{name} {c['seconds']:.0f}s" for name, c in lever["candidates"].items())
        lines.append(f"lever: {lever['reason']} (time: {took})")
    steps = report.get("scoring_steps")
    if steps:
        lines.append(f"scoring: {steps['used']} adaptor steps per block instead of {steps['asked']}, to fit the time "
                     "budget")
    quantization = report.get("quantization") or {}
    if quantization.get("block_work_skipped"):
        lines.append(f"{quantization['block_work_skipped']} (no block profiled or scored)")
    if quantization.get("mode") in ("auto", "int8") and not quantization.get("used") and quantization.get("reason"):
        lines.append(quantization["reason"])  # why int8 is off: it cannot run here, or was slower or inaccurate
    if quantization.get("used"):
        lines.append(_int8_line(quantization, bool(report["dropped"])))
    if latency:
        lines.append(f"latency {latency['original_ms']:.3f} ms -> {latency['optimized_ms']:.3f} ms "
                     f"(measured cut {100 * latency['cut']:.1f}%, target {100 * latency['target']:.1f}%)")
        if latency["cut"] < latency["target"] - SHORTFALL_NOISE:
            lines.append(_shortfall_line(latency, report.get("resumed_from_cache") or {}))
        given = latency.get("given_file") or {}
        if abs(given.get("ratio", 1.0) - 1.0) > GIVEN_FILE_NOISE:
            pace = "slower" if given["ratio"] < 1 else "faster"
            lines.append(f"the input file as given is {pace} than its simplified form, which graphprune times and "
                         f"writes ({given['ms']:.3f} ms against {given['original_ms']:.3f} ms, timed together): "
                         f"against the file as given the cut is {100 * given['cut']:.1f}%")
    else:  # a pipeline a user wrote without the step
        lines.append("latency of the result not measured (the pipeline has no measure_result step)")
    recovery = report.get("recovery") or {}
    if recovery.get("diverged"):  # no held-out images: training left its own images' error above the start
        lines.append("recovery kept the untrained weights: training raised the feature error on the tiny set "
                     "itself (a lower --recovery-lr may train)")
    elif recovery.get("kept_step") == 0:  # early stopping kept the start: training never helped held-out images
        stop = f", stopped at step {recovery['stopped_at']}" if recovery.get("stopped_at") else ""
        signal = recovery.get("guard_signal") or "feature error"
        lines.append(f"recovery kept the untrained weights: no checkpoint lowered the held-out {signal}{stop}")
    held_out = report.get("held_out")
    if held_out:
        lines.append(_held_out_line(held_out))
        if held_out.get("warning"):
            others = [hint for hint in (_int8_hint(quantization), "--lever auto, which also tries the network at a "
                      "lower resolution inside the graph" if lever.get("resolution_applies") else "") if hint]
            lines.append(f"warning: the optimised model keeps little of the original's function on the held-out "
                         f"images ({held_out['warning']}); a smaller --latency-cut or more images may serve "
                         "better" + (f" (or {'; or '.join(others)})" if others else ""))
    if "eval" in report:
        lines.extend(_eval_lines(report["eval"]))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in report["seconds_per_stage"].items())
    lines.append(f"time: {stages}")
    budget = (report.get("settings") or {}).get("time_budget_s")
    took = sum(report["seconds_per_stage"].values())
    if budget and took > (1 + BUDGET_SLACK) * budget:
        longest = sorted(report["seconds_per_stage"].items(), key=lambda kv: -kv[1])[:2]
        lines.append(f"warning: the steps took {took:.0f} s, over the {budget:.0f} s --time-budget; the longest: "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in longest) + " (no stage goes below timing each "
                     "distinct block once and scoring each block once without adaptors, whatever the budget)")
    if report.get("changed_by") == []:  # a --passes list of analyses, or transforms with nothing to do
        lines.append(f"no step changed the model (steps run: {', '.join(report['pipeline'])}): "
                     "the output is the input as it was")
    if "output" in report:
        lines.append(f"wrote {report['output']}")
    return "\n".join(lines)


def _block_lines(report: dict) -> list[str]:
    lines = [f"{'block':<28} {'recoverability':>14} {'saved':>7} {'score':>10}  dropped"]
    for b in report["blocks"]:
        rec = "-" if b["recoverability"] is None else f"{b['recoverability']:.4g}"
        saved = "-" if b["saved_fraction"] is None else f"{100 * b['saved_fraction']:.1f}%"
        score = "-" if b["score"] is None else f"{b['score']:.4g}"
        lines.append(f"{b['name']:<28} {rec:>14} {saved:>7} {score:>10}  {'yes' if b['dropped'] else ''}")
    return [*lines, "", f"dropped {len(report['dropped'])} of {len(report['blocks'])} blocks: "
                        f"{', '.join(report['dropped'])}"]


def _resolution_lines(resolution: dict) -> list[str]:
    """The sizes measured (lever "resolution") and the one chosen."""
    measured = ", ".join(f"{m['size'][0]}x{m['size'][1]} {100 * m['cut']:.1f}%"
                         + (f" (mean of {len(m['timings'])})" if len(m.get("timings", ())) > 1 else "")
                         for m in resolution["measurements"])
    chosen = resolution["size"]
    head = (f"resolution: the network runs at {chosen[0]}x{chosen[1]} behind a resize at its entry (the input is "
            f"unchanged)" if chosen else "resolution: unchanged")
    return [head, f"  {resolution['reason']}" + (f"; measured cuts: {measured}" if measured else "")]


def _shortfall_line(latency: dict, cached: dict) -> str:
    """The written model's measured cut is short of the target: selection's own measurement of the
    same model reached it (else selection would have said the target is out of reach), so the two
    timings disagree, as they do where the machine's load changed between them or block timings came
    from the cache of an earlier run under other load (a YOLOv8n at 10%: selection 17.7%, the
    written file 2.3%, its six block timings cached from a run at load average 7), or as one timing
    moves by about a point in episodes on a shared machine (benchmarks/studies/session_noise.py)."""
    selected = latency.get("selection_cut")
    selection = f"; selection measured {100 * selected:.1f}% for the same model" if selected is not None else ""
    rows = cached.get("latency_rows") or 0
    cache = f", {rows} block timings from the cache of an earlier run" if rows else ""
    return (f"warning: the written model's measured cut, {100 * latency['cut']:.1f}%, is short of the "
            f"{100 * latency['target']:.1f}% target{selection}{cache}: the timings disagree, as they do when other "
            "work loads the machine; re-run on an idle machine (with an empty --cache-dir where timings were cached), or "
            "raise --margin (--resolution-margin for the resolution lever) above the timings' noise (about a point "
            "on a shared machine)")


def _int8_hint(quantization: dict) -> str:
    """What int8 could still do for a model broken on the held-out images: nothing where it was used;
    ``--quantize auto`` where it was not asked for; ``--quantize int8`` where auto left it off (its
    accuracy bound is on int8's loss alone, while dropping blocks instead can lose more: nudenet's
    YOLOv8n at a 15% cut, blocks only, kept mAP50 0.18 of its detections, int8 0.90)."""
    if quantization.get("used"):
        return ""
    if quantization.get("mode") in (None, "none"):
        return "int8: --quantize auto"
    candidates = (quantization.get("plan") or {}).get("candidates") or []
    faster = any((c.get("timing") or {}).get("cut", 0) > 0 for c in candidates if not c.get("error"))
    return "--quantize int8, which auto left off" if faster else ""  # not where int8 cannot run or is slower


def _eval_lines(evaluation: dict) -> list[str]:
    """Fidelity on --eval-data (``evaluate``): top-1, agreement, kept and added detections, each
    output's relative error; the optimised model is the written file (int8 where it is)."""
    orig, opt = evaluation["original"], evaluation["optimized"]
    lines = []
    if "top1" in orig:
        lines.append(f"top-1 {100 * orig['top1']:.2f}% -> {100 * opt['top1']:.2f}% on {orig['images']} images")
    outputs = opt.get("outputs", {})
    if "agreement" in opt and not _agreement_per_position(opt):
        lines.append(f"top-1 agreement with the original: {100 * opt['agreement']:.2f}%")
    for name, output in outputs.items():
        if "positions_agreement" in output:  # a class per position: a recogniser's text
            lines.append(f"{name}: the original's top class at every position on {100 * output['agreement']:.2f}% "
                         f"of {opt['images']} images ({100 * output['positions_agreement']:.2f}% of positions)")
            if output.get("ctc"):
                lines.append(f"  {_ctc_words(output['ctc'])}")
        if "detections" in output:
            d = output["detections"]
            lines.append(f"{name} decoded as {output['layout']}")
            lines.append(f"  kept {d['kept']} of the original's {d['original']} detections "
                         f"({_percent(d['kept_fraction'])}), added {d['added']} ({_percent(d['added_fraction'])} "
                         f"of its {d['optimized']}) on {opt['images']} images{_map50(d)}")
        if output.get("map_iou") is not None:
            lines.append(f"{name}: IoU of the regions it marks with the original's {output['map_iou']:.3f} "
                         f"(thresholds integrated out) on {opt['images']} images")
    errors = [f"{name} {output['relative_error']:.4g}" for name, output in outputs.items()
              if output.get("relative_error") is not None]
    if errors:
        lines.append(f"relative output error ||y - y_orig|| / ||y_orig||: {', '.join(errors)}")
    return lines


def _int8_line(quantization: dict, dropped: bool) -> str:
    """What int8 did where it was written: the plan's choice and reason, mimicking's training, the
    nodes kept in float, and, with blocks dropped too, each one's share of the measured cut."""
    chosen = ((quantization.get("plan") or {}).get("chosen") or {}).get("label")
    reason = quantization.get("reason") or "as planned"
    named = f" ({chosen})" if chosen and not reason.startswith(chosen) else ""  # the plan's reasons start with it
    line = f"quantised to int8{named}: {reason}"
    mimic = quantization.get("mimic")
    if mimic:
        line += (f"; weights trained by quantisation-aware mimicking ({mimic.get('steps')} steps, "
                 f"{mimic.get('seconds', 0):.0f}s)")
    if quantization.get("float_nodes"):
        line += f"; {len(quantization['float_nodes'])} nodes kept in float"
    split = quantization.get("cut")
    if dropped and split:
        line += (f"; of the {100 * split['total']:.1f}% cut, dropping blocks {100 * split['float_only']:.1f}% "
                 f"and int8 the rest")
    return line


def _held_out_line(held_out: dict) -> str:
    """The written model against the original on the tiny set's held-out images (check_fidelity)."""
    where = (f"on the {held_out['images']} held-out tiny images"
             f"{' (recovery trained on them too)' if held_out['trained_on_by_recovery'] else ''}")
    result = held_out["result"]
    if result is None:
        return f"against the original {where}: not compared ({held_out['error']})"
    parts = []
    if result.get("agreement") is not None:
        kind = "every position" if _agreement_per_position(result) else "top-1"
        parts.append(f"{kind} agreement {100 * result['agreement']:.1f}%")
    for output in result.get("outputs", {}).values():
        if output.get("ctc"):
            parts.append(f"same CTC text {100 * output['ctc']['text_agreement']:.1f}%")
        if "detections" in output:
            d = output["detections"]
            parts.append(f"kept {d['kept']} of {d['original']} detections, added {d['added']}{_map50(d)}")
        if output.get("map_iou") is not None:
            parts.append(f"map IoU {output['map_iou']:.3f}")
    errors = [o["relative_error"] for o in result.get("outputs", {}).values() if o.get("relative_error") is not None]
    if errors:
        parts.append(f"relative output error {max(errors):.3g}")
    return f"against the original {where}: {'; '.join(parts) or 'compared'}"


def _ctc_words(ctc: dict) -> str:
    """A class-per-position output read as CTC text (ctc.CtcText), with the blank it assumed."""
    rate = ctc["character_error_rate"]
    return (f"read as CTC text (blank = class {ctc['blank']}, the original's top class at "
            f"{100 * ctc['blank_share']:.0f}% of positions): the same text on {100 * ctc['text_agreement']:.2f}% "
            f"of images, character error rate {'-' if rate is None else f'{100 * rate:.2f}%'} against the original's")


def _agreement_per_position(result: dict) -> bool:
    """Whether ``evaluate``'s headline ``agreement`` comes from a class-per-position output (a
    recogniser's: the same top class at every position) rather than from class scores."""
    headline = next((o for o in result.get("outputs", {}).values() if "agreement" in o), {})
    return "positions_agreement" in headline


def _map50(detections: dict) -> str:
    """mAP@0.5 with the original's confident detections as the ground truth, and the other way (fidelity.py)."""
    forward, reverse = detections.get("map50"), detections.get("map50_reverse")
    if forward is None:
        return ""
    return f"; mAP50 {forward:.3f} against the original's" + ("" if reverse is None else f", {reverse:.3f} the other way")


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def write_plot(report: dict, path: Path) -> None:
    """Left: each block's score (recoverability / latency saved) against the latency it saves,
    dropped blocks marked. Right: the recovery loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [b for b in report["blocks"] if b["score"] is not None and b["saved_fraction"] is not None]
    for dropped, colour, label in ((False, "tab:blue", "kept"), (True, "tab:red", "dropped")):
        pts = [b for b in rows if b["dropped"] == dropped]
        left.scatter([100 * b["saved_fraction"] for b in pts], [b["score"] for b in pts], c=colour, label=label, s=22)
    for b in rows:
        left.annotate(b["name"], (100 * b["saved_fraction"], b["score"]), fontsize=6, alpha=0.7)
    if any(b["score"] > 0 for b in rows):  # a log axis needs a positive value (a pipeline may score none)
        left.set_yscale("log")
    left.set_xlabel("latency saved by dropping the block alone (%)")
    left.set_ylabel("score = recoverability / latency saved")
    left.set_title("block scores (lowest are dropped first)")
    left.legend()
    curve = (report.get("recovery") or {}).get("loss_curve") or []
    if curve:
        right.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        if any(c["loss"] > 0 for c in curve):
            right.set_yscale("log")
    right.set_xlabel("recovery step")
    right.set_ylabel("feature MSE (train, augmented)")
    right.set_title("recovery")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
