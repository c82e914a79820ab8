"""The report of ``benchmarks.compare_methods``: a Markdown table per model (mean ± sd over seeds, where
each row's recovery ran), graphprune's lead over each method paired by seed, and a plot of top-1
against measured cut, one line per method."""

from __future__ import annotations

import statistics
from collections import Counter

from benchmarks.common import results_dir
from benchmarks.compare_rows import GRAPHPRUNE_SELECTED, ORDER, load_rows, reference_cpu, stale_parts, stale_reason


def write_report() -> None:
    rows_of = {model: load_rows(model) for model in ("resnet56", "resnet20")}
    cpu = reference_cpu([r for rows in rows_of.values() for r in rows])
    lines = ["# graphprune vs peers on CIFAR-10 (real weights, real images)", "",
             "Command: `python -m benchmarks.compare_methods run --grid all && python -m benchmarks.compare_methods report`",
             "", "top-1 on test_lossless_1000 (exact pixels, ±0.9 points sampling error at n=1000); jpeg10k only"
             " compares methods (JPEG-degraded, about 10 points lower for every model). Cut: measured by"
             " onnxruntime CPU, 1 thread, batch 1, interleaved with the original, on a 2-core machine."
             " Rows compare only with rows whose cut was measured on the same CPU: the reference is"
             f" {cpu} (the CPU of most rows made with today's settings); rows from other CPUs are marked"
             " and paired by seed only among themselves. Rows recovered on a GPU (`python -m benchmarks.device_rows`) count the GPU's"
             " recovery seconds in their wall time.", ""]
    for model, rows in rows_of.items():
        if not rows:
            continue
        lines += [f"## {model}", "", "| method | samples | target cut | seeds | top-1 lossless1000 (mean ± sd) |"
                  " top-1 jpeg10k | measured cut (min) | wall s | recovered on |", "|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for r in rows:
            groups.setdefault((r["latency_cut_target"], r["samples"], _label(r, cpu)), []).append(r)
        for (cut, samples, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], _rank(kv[0][2]))):
            mean, sd = _mean_sd([100 * r["top1_lossless1000"] for r in rs])
            jpeg = [100 * r["top1_jpeg10k"] for r in rs]
            lines.append(f"| {method} | {samples} | {cut:.2f} | {len(rs)} | {mean:.2f} ± {sd:.2f} | "
                         f"{statistics.mean(jpeg):.2f} | {min(r['latency_cut_measured'] for r in rs):.3f} | "
                         f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {_devices(rs)} |")
        lines.append("")
        for row_cpu in [cpu] + sorted({r["cpu"] for r in rows if r.get("cpu") and r["cpu"] != cpu}):
            for earlier_recovery in (False, True):
                for earlier_selection in (False, True):
                    lines += _paired(rows, row_cpu, row_cpu == cpu, earlier_selection, earlier_recovery)
    (results_dir() / "compare_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(cpu)


def _paired(rows: list[dict], cpu: str, reference: bool, earlier_selection: bool = False,
            earlier_recovery: bool = False) -> list[str]:
    """graphprune against each other method on the seeds both ran, using only rows measured on
    ``cpu`` with today's settings: the mean per-seed lead, its standard error (sd of the paired
    differences / sqrt(n)) and range. Pairing removes what a seed's tiny set does to every method alike.
    ``earlier_selection``: the same for graphprune-selected rows made with earlier selection
    settings, against the other methods' rows; ``earlier_recovery``: for rows (of every method)
    recovered with an earlier recovery recipe. A record of what those settings gave: rows are
    paired only with rows whose settings differ from today's in the same way."""
    def usable(r: dict) -> bool:
        wanted = {"earlier recovery"} if earlier_recovery and r["method"] != "no-recovery" else set()
        if earlier_selection and r["method"] in GRAPHPRUNE_SELECTED:
            wanted.add("earlier selection")
        return set(stale_parts(r, cpu)) == wanted  # a row of another CPU is never wanted
    current = {(r["samples"], r["latency_cut_target"], r["method"], r["seed"]): r for r in rows if usable(r)}
    seeds_of: dict[tuple, dict[str, set]] = {}  # (samples, cut) -> method -> seeds
    for samples, cut, method, seed in current:
        seeds_of.setdefault((samples, cut), {}).setdefault(method, set()).add(seed)
    out = []
    for (samples, cut), methods in sorted(seeds_of.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        if "graphprune" not in methods:
            continue
        for other in sorted(set(methods) - {"graphprune"}, key=_rank):
            seeds = sorted(methods[other] & methods["graphprune"])
            if not seeds:
                continue
            lead = {test: [100 * (current[samples, cut, "graphprune", s][test] - current[samples, cut, other, s][test])
                           for s in seeds] for test in ("top1_lossless1000", "top1_jpeg10k")}
            mean, sd = _mean_sd(lead["top1_lossless1000"])
            se = f"{sd / len(seeds) ** 0.5:.2f}" if len(seeds) > 1 else "-"
            out.append(f"| {samples} | {cut:.2f} | {other} | {len(seeds)} | {mean:+.2f} | {se} | "
                       f"{min(lead['top1_lossless1000']):+.1f} to {max(lead['top1_lossless1000']):+.1f} | "
                       f"{statistics.mean(lead['top1_jpeg10k']):+.2f} |")
    if not out:
        return []
    which = "the reference CPU" if reference else "another CPU, compared only among its own rows"
    made = "graphprune-selected rows made with earlier selection settings, the other methods' current rows" \
        if earlier_selection else "rows made with the current defaults"
    if earlier_recovery:
        made = made.replace("current rows", "rows").replace("the current defaults", "the current selection") + \
            ", all recovered with the earlier recovery recipe"
    return [f"graphprune's lead, paired by seed ({made}, cut measured on {cpu}: {which}):", "",
            "| samples | target cut | vs | seeds | lead lossless1000 | standard error | per seed | lead jpeg10k |",
            "|---|---|---|---|---|---|---|---|", *out, ""]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _label(row: dict, cpu: str) -> str:
    """The method, marked where the row does not compare with the reference CPU's rows made with
    today's settings (``stale_reason``)."""
    reason = stale_reason(row, cpu)
    return row["method"] + (f" ({reason})" if reason else "")


def _rank(label: str) -> tuple[int, str]:
    method = label.split(" ")[0]
    return (ORDER.index(method) if method in ORDER else len(ORDER), label)


def _one_cpu(rows: list[dict], cpu: str) -> list[dict]:
    """The rows measured on ``cpu`` if any are, else those of the CPU that measured most of them:
    a point never averages cuts measured on two CPUs."""
    counts = Counter(r.get("cpu") for r in rows)
    chosen = cpu if cpu in counts else counts.most_common(1)[0][0]
    return [r for r in rows if r.get("cpu") == chosen]


def _devices(rows: list[dict]) -> str:
    """Where the rows' recoveries ran: this 2-core CPU unless ``benchmarks.device_rows`` sent them to a GPU, or
    another CPU where the row took that CPU's recovery of the same network (``earlier_recovery``)."""
    counts: dict[str, int] = {}
    for r in rows:
        recovery = r.get("recovery") or {}
        device = recovery.get("device") or "cpu"
        name = device.replace("NVIDIA ", "").replace(" 80GB HBM3", "")
        if "reused_from" in recovery:
            name += f" (reused from {recovery['reused_from']['cpu']})"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def _plot(cpu: str) -> None:
    """One line per method through its mean top-1 (± sd over seeds) at each target, from the rows
    measured on one CPU (the reference ``cpu`` where it has any, ``_one_cpu``); a hollow marker where
    some of that point's rows do not compare with the reference rows (``stale_reason``). The axis
    is zoomed on the recovered methods; points below it are named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in ("resnet56", "resnet20"):
        rows = [r for r in load_rows(model) if r["samples"] == 500]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        methods = sorted({r["method"] for r in rows}, key=_rank)
        floor = 80.0
        for i, method in enumerate(methods):
            by_target: dict[float, list[dict]] = {}
            for r in rows:
                if r["method"] == method:
                    by_target.setdefault(r["latency_cut_target"], []).append(r)
            points = []
            for _, group in sorted(by_target.items()):
                group = _one_cpu(group, cpu)
                mean, sd = _mean_sd([100 * r["top1_lossless1000"] for r in group])
                points.append((statistics.mean(r["latency_cut_measured"] for r in group), mean, sd,
                               any(stale_reason(r, cpu) for r in group)))
            below = [f"{y:.1f} at {x:.2f}" for x, y, _, _ in points if y < floor]
            label = method + (f" (below the axis: {', '.join(below)})" if below else "")
            shown = [p for p in points if p[1] >= floor]
            colour = plt.cm.tab10(i % 10)
            ax.plot([p[0] for p in shown], [p[1] for p in shown], color=colour, label=label)
            for x, y, sd, stale in shown:
                ax.errorbar(x, y, yerr=sd, color=colour, marker="o", capsize=3,
                            markerfacecolor="white" if stale else colour)
        ax.set_ylim(floor, None)
        ax.set_xlabel("measured latency cut (onnxruntime CPU, 1 thread)")
        ax.set_ylabel("top-1 on test_lossless_1000 (%)")
        ax.set_title(f"CIFAR-10 {model}, 500 images, cuts measured on {cpu}\n(hollow: rows measured on"
                     " another CPU, or made with earlier selection settings)", fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(results_dir() / f"cifar10_{model}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
