"""The consolidation advice as plain data, from the advisor's measurements (:mod:`unirec.advise` runs
them, :mod:`unirec.advice_report` writes them out): per task the predicted benefit and its verdict, the
sign, the predicted relative lift, the recommended grouping and the evidence behind it."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from unirec.affinity import AffinityLog, alignment, benefit, best_grouping, normalised, onto


def _matrix(x: torch.Tensor, names: List[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """[K, K] -> i -> j -> value (None for NaN, so the JSON stays standard)."""
    return {
        i: {j: (None if math.isnan(v) else v) for j, v in zip(names, row)}
        for i, row in zip(names, x.tolist())
    }


def verdict(b: float, se: float) -> str:
    """gains / loses when the predicted benefit is two standard errors clear of 0, else unclear."""
    if math.isnan(b):
        return "unmeasured"
    if math.isnan(se):
        return "gains" if b > 0 else "loses"
    return "gains" if b - 2 * se > 0 else "loses" if b + 2 * se < 0 else "unclear"


def task_alignment(
    names: List[str], acc: AffinityLog, tables: Mapping[str, str]
) -> Tuple[Dict[str, Dict], Dict[str, Optional[float]]]:
    """The :func:`unirec.affinity.alignment` matrix of every candidate table the log kept gradients for
    (table -> i -> j -> value), and each task's mean alignment with the other tasks whose candidates read
    its table (None where no other task does, or none was measured)."""
    mats = {tab: alignment(acc.grads[tab]) for tab in sorted(set(tables.values())) if tab in acc.grads}
    per_task: Dict[str, Optional[float]] = {}
    for k, t in enumerate(names):
        m = mats.get(tables.get(t))
        mates = [j for j, u in enumerate(names) if u != t and tables.get(u) == tables.get(t)]
        vals = [] if m is None else [v for j in mates if not math.isnan(v := float(m[k, j]))]
        per_task[t] = sum(vals) / len(vals) if vals else None
    return {tab: _matrix(m.float(), names) for tab, m in mats.items()}, per_task


def build_advice(
    names: List[str],
    acc: AffinityLog,
    ov: Dict,
    max_tasks: int,
    tables: Optional[Mapping[str, str]] = None,
    min_alignment: Optional[float] = None,
) -> Dict:
    """The advice as plain data (see :func:`recommendation` for each task's entry). ``tables``: task ->
    its candidate table's parameter (:func:`unirec.advise.candidate_tables`), for the alignment rule of
    ``min_alignment``. The sign (``helps``): without the rule (None), the predicted benefit's; with it, a
    task whose alignment is below it is predicted to lose and is taken out of its group, and every other
    task is predicted to gain unless its verdict is ``loses`` (its benefit two standard errors below 0)."""
    z = acc.mean_affinity()
    a = normalised(z)
    b, se = benefit(acc.steps, z)
    am = _matrix(a, names)
    an = {i: {j: (0.0 if v is None else v) for j, v in r.items()} for i, r in am.items()}  # unknown: 0
    mats, align = task_alignment(names, acc, tables or {})
    misaligned = {
        t for t in names if min_alignment is not None and align[t] is not None and align[t] < min_alignment
    }
    kept = [t for t in names if t not in misaligned]  # the search runs over the others only
    grouping = best_grouping({i: {j: an[i][j] for j in kept} for i in kept}, max_tasks)
    groups = grouping.groups + [[t] for t in names if t in misaligned]
    into = onto(groups, an)
    cos = _matrix(acc.mean_cosine(), names)
    tasks = {}
    for k, t in enumerate(names):
        group = next(g for g in groups if t in g)
        tasks[t] = recommendation(t, group, float(b[k]), float(se[k]), into[t], am, cos, ov)
        tasks[t]["alignment"] = align[t]
        if min_alignment is None:
            tasks[t]["helps"] = float(b[k]) > 0
        else:
            tasks[t]["helps"] = tasks[t]["verdict"] != "loses" and t not in misaligned
        if align[t] is not None:
            tasks[t]["evidence"].append(
                f"gradient alignment with the other tasks at its candidates' table {align[t]:.3f} (linear CKA "
                "of the summed gradients)"
                + (f", below advise.min_alignment={min_alignment:g}: predicted to lose, kept bespoke"
                   if t in misaligned else "")
            )  # fmt: skip
        if t in misaligned:
            tasks[t]["recommendation"] = (
                "keep bespoke: its use of the shared candidate table is unrelated to the other tasks'"
            )
    one = best_grouping_score(am, [names])
    return {
        "tasks": names,
        "affinity": _matrix(z, names),
        "normalised_affinity": am,
        "cosine": cos,
        "overlap": ov,
        "measured_steps": len(acc.steps),
        "alignment": mats,
        "min_alignment": min_alignment,
        "grouping": {
            "groups": groups,
            "score": sum(into.values()),
            "searched": grouping.searched,
            "one_model_score": one,
            "bespoke_score": 0.0,
        },  # fmt: skip
        "advice": tasks,
    }


def headroom(value: Optional[float]) -> float:
    """(1 - v) / v of a metric in (0, 1]: how far a task is from a perfect score, relative to where it is.
    NaN where the metric is missing or not in (0, 1]."""
    if value is None or not 0 < value <= 1:
        return math.nan
    return (1 - value) / value


def add_predicted_lift(adv: Dict, valid: Mapping[str, Mapping[str, float]], metric: str) -> None:
    """Each task's predicted relative lift of one model for all tasks: the predicted benefit (a relative
    gain in the task's loss, first order) times the task's :func:`headroom` in ``metric`` on validation at
    the end of the short run. A task near the top of its metric has little to gain however related the
    others are; one far from it gains relatively more from the same benefit. The sign is the benefit's,
    so the verdict is unchanged; the lift orders the tasks by how much they stand to gain."""
    adv["headroom_metric"] = metric
    for t, a in adv["advice"].items():
        value = valid.get(t, {}).get(metric)
        room = headroom(value)
        lift = a["benefit"] * room
        a[f"short_run_{metric}"] = value
        a["headroom"] = None if math.isnan(room) else room  # None, not NaN: standard JSON
        a["predicted_lift"] = None if math.isnan(lift) else lift
        if a["predicted_lift"] is not None:
            a["evidence"].append(
                f"short-run validation {metric} {value:.4f}: headroom {a['headroom']:.2f}, predicted relative "
                f"lift {a['predicted_lift']:+.3f}"
            )


def best_grouping_score(am: Mapping[str, Mapping[str, Optional[float]]], groups: List[List[str]]) -> float:
    """Total normalised affinity onto each task from its group, for a given grouping (unknown pairs: 0)."""
    return sum(am[i][j] or 0.0 for g in groups for j in g for i in g if i != j)


def recommendation(
    t: str, group: List[str], b: float, se: float, onto: float, am: Dict, cos: Dict, ov: Dict
) -> Dict:
    """One task's entry: where it goes, why, and how sure the measurement is."""
    others = [i for i in am if i != t and am[i][t] is not None]
    helps = max(others, key=lambda i: am[i][t], default=None)
    hurts = min(others, key=lambda i: am[i][t], default=None)
    mates = [i for i in group if i != t]
    v = verdict(b, se)
    if mates:
        rec = f"share one model with {', '.join(mates)}"
    else:
        rec = "keep bespoke: no group lifts it above what it gets alone"
    evidence = [
        f"predicted benefit of one model for all tasks {b:+.3f} ± {se:.3f} (standard error over measured "
        f"steps): {v}",
        f"affinity onto {t} from its recommended group {onto:+.3f}",
    ]
    if helps is not None:
        evidence.append(f"helped most by {helps} ({am[helps][t]:+.3f}, gradient cosine {cos[helps][t]:+.2f}); "
                        f"hurt most by {hurts} ({am[hurts][t]:+.3f}, gradient cosine {cos[hurts][t]:+.2f})")  # fmt: skip
    for m in mates:
        evidence.append(f"with {m}: context fields overlap {ov['context'][t][m]:.2f}, same candidate type "
                        f"{'yes' if ov['candidate_type'][t][m] else 'no'}, candidate set overlap {ov['candidate_set'][t][m]:.2f}")  # fmt: skip
    return {"group": group, "recommendation": rec, "benefit": b, "stderr": se, "verdict": v,
            "onto_from_group": onto, "helped_most_by": helps, "hurt_most_by": hurts, "evidence": evidence}  # fmt: skip
