"""The results files of ``benchmarks.compare_methods``: which methods there are, what a row records about
how its blocks were chosen, and which rows compare with which.

Rows of different CPUs live side by side (block savings differ between CPUs, so each method may
choose differently on each): a row replaces only the row of the same id from the same CPU, a
report compares rows of one CPU at a time with the CPU of most current rows as its reference
(``reference_cpu``), and a row made on a new CPU may take the top-1 of the same network recovered
on another (``earlier_recovery``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.common import results_dir

DESCRIPTION = "graphprune against its peers on real weights and real images (CIFAR-10 ResNet-56/20, as ONNX)."
MAIN_METHODS = ["graphprune", "block-influence", "filter-l1", "random-blocks", "graphprune-bp", "no-recovery"]
DATA_METHODS = ["ood-imagenet", "data-free-procedural", "data-free-bn-inversion"]
ORDER = MAIN_METHODS + DATA_METHODS
# rows whose blocks come from graphprune's own selection (recoverability / pooled latency saved)
GRAPHPRUNE_SELECTED = {"graphprune", "graphprune-bp", "no-recovery", *DATA_METHODS}


def machine_label(name: str, signature: str = "") -> str:
    """How rows name a CPU: its model name, and its family and model where known. Virtual machines
    show different CPUs under one name: "AMD EPYC" was a family-26 (Zen 5) machine in one session
    and a family-25 (Zen 3, 3-4x slower at recovery) one in the next, and their block savings
    need not agree, so their rows must not replace or be compared with each other's."""
    words = signature.split()
    known = dict(zip(words[1::2], words[2::2]))  # "AuthenticAMD family 26 model 2 stepping 1"
    if "family" in known and "model" in known:
        return f"{name}, family {known['family']} model {known['model']}"
    return name


def this_machine() -> str:
    """This machine's CPU as rows name it (:func:`machine_label`)."""
    from graphprune.backends.environment import cpu_name, cpu_signature

    return machine_label(cpu_name(), cpu_signature())


def selection_settings() -> dict:
    """How graphprune chooses blocks today; recorded in every graphprune-selected row, so rows made
    with earlier defaults can be told apart (``report``) and redone (``run --redo-stale``)."""
    from graphprune.optimize import OptimizeConfig

    scoring = OptimizeConfig().recoverability
    return {"estimator": scoring.estimator, "iterations": scoring.iterations, "optimizer": scoring.optimizer,
            "lr": scoring.lr, "pooled_latency": True, "refine": asdict(OptimizeConfig().refine)}


def reference_cpu(rows: list[dict]) -> str:
    """The CPU whose rows a report compares: the one with most of ``rows`` made with today's
    settings (``stale_parts`` empty on their own CPU), so the headline tables show what the product
    does now rather than where most rows were once made; ties go to the CPU of most rows. Rows from
    the first, unnamed AMD EPYC machine do not count; with no named rows, this machine. A report
    made on any machine from the same results file reads the same."""
    named = [r for r in rows if r.get("cpu")]
    if not named:
        return this_machine()
    current = Counter(r["cpu"] for r in named if not stale_parts(r, r["cpu"]))
    total = Counter(r["cpu"] for r in named)
    return max(total, key=lambda cpu: (current[cpu], total[cpu]))


def recovery_settings(row: dict):
    """How a row of ``row["method"]`` recovers today (a RecoverySettings): the product's default
    recovery with the row's seed; the BP baseline trains on labels instead."""
    from graphprune.optimize import OptimizeConfig

    settings = replace(OptimizeConfig().recovery, seed=row["seed"])
    return replace(settings, loss="label", lr=1e-4) if row["method"] == "graphprune-bp" else settings


def recovery_recipe(settings: dict) -> dict:
    """The recovery settings that decide what a recovery does, with the keys added since a row was
    made filled in as they were then: not its seed (each row has its own) or its device."""
    recipe = {**RECOVERY_SETTINGS_ADDED, **settings}
    for key in ("seed", "device"):
        recipe.pop(key, None)
    if recipe.get("loss") == "label":  # what "mimic" matches does not apply to label training
        recipe.pop("target", None)
    return recipe


def stale_parts(result: dict, cpu: str | None = None) -> list[str]:
    """Why a finished row does not compare with rows made on ``cpu`` (default: this machine) with
    today's settings, if it does not: its cut was measured on another CPU (block savings differ
    between CPUs, so every method would choose differently; then that alone); else "earlier
    selection" (it is graphprune-selected with other selection settings than today's) and/or
    "earlier recovery" (it was recovered with another recipe than its method's today)."""
    if result.get("cpu") != (cpu or this_machine()):
        return [f"cut measured on {result.get('cpu') or 'an earlier AMD EPYC machine'}"]
    parts = []
    if result["method"] in GRAPHPRUNE_SELECTED and result["removed"].get("selection") != selection_settings():
        parts.append("earlier selection")
    recorded = (result.get("recovery") or {}).get("settings")
    if recorded and result["method"] != "no-recovery" \
            and recovery_recipe(recorded) != recovery_recipe(asdict(recovery_settings(result))):
        parts.append("earlier recovery")
    return parts


def stale_reason(result: dict, cpu: str | None = None) -> str | None:
    """``stale_parts`` joined by ", ", or None for a row that compares with today's."""
    return ", ".join(stale_parts(result, cpu)) or None


def is_stale(result: dict) -> bool:
    return stale_reason(result) is not None


def results_path(model: str) -> Path:
    return results_dir() / f"cifar10_{model}.json"


def load_rows(model: str) -> list[dict]:
    path = results_path(model)
    return json.loads(path.read_text())["rows"] if path.exists() else []


def append_row(model: str, row: dict) -> None:
    """Add ``row``, replacing the row of the same id measured on the same CPU: rows from other CPUs
    stay, since each CPU's rows are compared among themselves (``reference_cpu``)."""
    rows = [r for r in load_rows(model) if (r["id"], r.get("cpu")) != (row["id"], row.get("cpu"))] + [row]
    path = results_path(model)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"description": DESCRIPTION, "rows": rows}, indent=1))
    tmp.replace(path)


# recovery settings added after rows were made, with the value those rows had (so they still match)
RECOVERY_SETTINGS_ADDED = {"target": "features"}


def same_vendor(cpu: str, other: str) -> bool:
    """Whether two CPU model names come from one vendor (their first word: ``Intel(R)``, ``AMD``)."""
    return cpu.split()[:1] == other.split()[:1]


def earlier_recovery(row: dict, removed: dict, settings: dict) -> dict | None:
    """A finished row (from this CPU, e.g. one made stale by a change of selection settings that
    chose the same blocks again, or from another named CPU) that recovered exactly the network
    ``removed`` describes: same method, model, tiny set, seed and recovery ``settings`` (a dict), the same
    blocks (or channel ratio), trained on a CPU of the same vendor. Its top-1 is this row's too:
    recovery is seeded and changes weights only, and on two Xeons every set both chose recovered to
    the same top-1 on both test sets, to the image (docs/BENCHMARKS.md, "second CPU"). Across vendors it does
    not: graphprune's 40% seed-2021 set recovered to 90.7 / 84.48 (lossless1000 / jpeg10k) on both
    Xeons and to 90.8 / 84.61 on an AMD EPYC (other floating-point kernels). Where selections
    agree, a row made on a new CPU then costs its selection and its cut, not 10-15 minutes of
    training; ``--recover-again`` trains anyway and records the earlier top-1 beside its own."""
    here = this_machine()
    for r in load_rows(row["model"]):
        recovery = r.get("recovery") or {}
        if (r["method"], r["samples"], r["seed"]) != (row["method"], row["samples"], row["seed"]) \
                or r.get("cpu") is None or not same_vendor(r["cpu"], here) \
                or {**RECOVERY_SETTINGS_ADDED, **(recovery.get("settings") or {})} != settings \
                or (recovery.get("device") or "cpu") != "cpu" or r["removed"]["tiny_set"] != removed["tiny_set"]:
            continue
        if "channel_ratio" in removed:
            if r["removed"].get("channel_ratio") == removed["channel_ratio"]:
                return r
        elif sorted(r["removed"].get("blocks", ())) == sorted(removed["blocks"]):
            return r
    return None
