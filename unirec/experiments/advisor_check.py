"""The advisor against measured truth: one point per (suite, task) with the advisor's prediction and the
measured lift of the unified model over the bespoke one, the acceptance figures read off them, the runs
behind them (cached) and the report (see ``scripts/advisor_validation.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from unirec.experiments.consolidation import run_suite
from unirec.experiments.stats import spearman
from unirec.experiments.suites import compose, suite_dir, trainer_overrides

# ------------------------------------------------------------------------------------------- statistics


def points(suite: str, tasks: Sequence[str], advice: Dict, measured: Dict, headline: str) -> List[Dict]:
    """One point per task: the advisor's predicted benefit and the measured lift (unified vs bespoke)."""
    out = []
    for t in tasks:
        c = measured["test"][f"{headline}|{t}|ndcg@10"]
        u, b = np.asarray(c["unified"]), np.asarray(c["bespoke"])
        spread = max(u.std(ddof=1), b.std(ddof=1)) if len(u) > 1 else 0.0
        a = advice["advice"][t]
        out.append({
            "suite": suite, "task": t, "predicted": a["benefit"], "stderr": a["stderr"], "verdict": a["verdict"],
            "predicted_lift": a.get("predicted_lift"), "short_run": a.get(f"short_run_{advice.get('headroom_metric')}"),
            "group": a["group"], "alignment": a.get("alignment"), "helps": a.get("helps"), "unified": float(u.mean()), "bespoke": float(b.mean()),
            "lift": float((u.mean() - b.mean()) / b.mean()), "difference": float(u.mean() - b.mean()),
            "spread": float(spread), "clear": bool(abs(u.mean() - b.mean()) > spread),
            "loses_every_seed": bool((u < b).all()),
        })  # fmt: skip
    return out


def ranking_score(p: Dict) -> float:
    """What the advisor orders the tasks by: its predicted relative lift, or (advice from before it had
    one) the predicted benefit."""
    return p["predicted"] if p.get("predicted_lift") is None else p["predicted_lift"]


def predicts_gain(p: Dict) -> bool:
    """The advisor's sign: its ``helps`` (the alignment rule and the verdict), or (advice from before it
    had one) the sign of the predicted benefit."""
    return p["predicted"] > 0 if p.get("helps") is None else p["helps"]


def summary(pts: List[Dict], costs: Dict[str, Dict[str, float]], held_out: Sequence[str] = ()) -> Dict:
    """The acceptance figures, computed from the points and the wall times. ``held_out``: suites the
    predictor was not designed on, whose correlation is also given alone."""
    clear = [p for p in pts if p["clear"]]
    out_pts = [p for p in pts if p["suite"] in held_out]
    agree = [p for p in clear if predicts_gain(p) == (p["difference"] > 0)]
    out_clear = [p for p in out_pts if p["clear"]]
    losers = [p for p in pts if p["suite"] == "synthetic-0.0" and p["clear"] and p["difference"] < 0]
    ratios = {s: c["advise_seconds"] / c["measure_seconds"] for s, c in costs.items()}
    return {
        "n": len(pts),
        "spearman": spearman([ranking_score(p) for p in pts], [p["lift"] for p in pts]),
        "spearman_benefit": spearman([p["predicted"] for p in pts], [p["lift"] for p in pts]),
        "held_out": list(held_out),
        "n_held_out": len(out_pts),
        "spearman_held_out": spearman([ranking_score(p) for p in out_pts], [p["lift"] for p in out_pts]),
        "spearman_benefit_held_out": spearman(
            [p["predicted"] for p in out_pts], [p["lift"] for p in out_pts]
        ),
        "clear_points": len(clear),
        "sign_agreement": len(agree),
        "sign_disagreements": [f"{p['suite']}/{p['task']}" for p in clear if p not in agree],
        "clear_points_held_out": len(out_clear),
        "sign_agreement_held_out": sum(p in agree for p in out_clear),
        "losers_at_0": [
            {"task": p["task"], "flagged": not predicts_gain(p), "verdict": p["verdict"]} for p in losers
        ],
        "cost_ratio": ratios,
        "max_cost_ratio": max(ratios.values()) if ratios else float("nan"),
    }


# ------------------------------------------------------------------------------------------------ runs


def advise_suite(suite, args, work: Path) -> Dict:
    """The advisor on the suite's tasks, as long as (a fraction of) the measurement's unified run."""
    from unirec import advise
    from unirec.data.prepare import prepare

    out = work / "advice" / suite.name
    if (out / "advice.json").exists():
        return json.loads((out / "advice.json").read_text())
    lr, size, tasks = args.lrs[0], args.sizes[0], list(suite.tasks)
    cfg = compose(suite, tasks, lr, size, 0)
    features = prepare(cfg.data, cfg.task, cfg.seed)  # the measurement's unified runs then find it prepared
    t0 = time.perf_counter()
    cfg = compose(suite, tasks, lr, size, 0, [*trainer_overrides(suite, cfg, features), *args.advise_set])
    adv = advise.run(cfg, out, features)
    adv["wall_seconds"] = round(time.perf_counter() - t0, 2)  # its data prepared before, as the measurement's
    (out / "advice.json").write_text(json.dumps(adv, indent=2, sort_keys=True))
    return adv


def measure_suite(suite, args, work: Path) -> Dict:
    """``run_suite`` of the consolidation report, its result kept beside the runs (reused when present)."""
    done = work / "measured" / f"{suite.name}.json"
    if done.exists():
        return json.loads(done.read_text())
    res = run_suite(suite, args)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(res, indent=2, sort_keys=True))
    return res


def add_reference_costs(res: Dict, reports: Path) -> None:
    """Beside each suite's measured cost, the wall time of the committed consolidation report of the same
    suite (its full protocol: the whole grid and its seeds), where ``reports`` holds one."""
    for name, c in res["costs"].items():
        path = reports / suite_dir(name) / "consolidation.json"
        if path.exists():
            ref = json.loads(path.read_text())
            c["reference_seconds"], c["reference_command"] = ref["seconds"], ref["command"]


# ---------------------------------------------------------------------------------------------- report


def write_report(res: Dict, out: Path) -> None:
    s, pts = res["summary"], res["points"]
    missing = [n for n in res["planned"] if n not in res["suites"]]
    lines = ["# Consolidation advisor: predicted benefit against measured lift", ""]
    if missing:
        lines += [f"**Partial**: {len(res['suites'])} of {len(res['planned'])} suites measured; missing: "
                  f"{', '.join(missing)}.", ""]  # fmt: skip
    lines += [
        f"Generated by `{res['command']}`. Measurement: the consolidation report's machinery "
        "(`unirec.experiments.consolidation.run_suite`, as `scripts/consolidation_report.py` runs it) "
        f"with lr {res['grid']['lr']}, sizes {res['grid']['size']}, "
        f"{res['seeds']} seeds, each run its suite's epochs; lift = (unified − bespoke) / bespoke of the test "
        "headline NDCG@10, mean over seeds. Advice: `python -m unirec.advise` with the first grid point and the "
        "unified run's length (advise.fraction of its steps), before anything else is trained.",
        "",
        "## Acceptance figures",
        "",
        f"- Spearman rank correlation of the advisor's predicted relative lift with the measured lift: "
        f"**{s['spearman']:+.3f}** over **{s['n']}** (task, data set) points (target ≥ 0.7); of the predicted "
        f"benefit alone (before the headroom): {s.get('spearman_benefit', s['spearman']):+.3f}.",
        f"- Sign agreement where the measured difference exceeds the seed spread: **{s['sign_agreement']}/"
        f"{s['clear_points']}**" + (f" (disagree: {', '.join(s['sign_disagreements'])})" if s["sign_disagreements"] else "")
        + " (target: all).",
    ]  # fmt: skip
    if s.get("held_out"):
        lines.append(f"- Held out (suites the predictor was not designed on: {', '.join(s['held_out'])}): "
                     f"**{s['spearman_held_out']:+.3f}** over {s['n_held_out']} points; predicted benefit alone "
                     f"{s['spearman_benefit_held_out']:+.3f}"
                     + (f"; sign agreement {s['sign_agreement_held_out']}/{s['clear_points_held_out']}"
                        if "sign_agreement_held_out" in s else "") + ".")  # fmt: skip
    per = {
        n: spearman(*zip(*[(ranking_score(p), p["lift"]) for p in pts if p["suite"] == n]))
        for n in res["suites"]
    }
    lines.append("- Within each suite (4 points each, so only a hint): " + ", ".join(f"{n} {r:+.2f}" for n, r in per.items())
                 + "; synthetic suites only: " + f"{spearman(*zip(*[(ranking_score(p), p['lift']) for p in pts if p['suite'] != 'ml100k'])):+.3f}"
                 + f" over {sum(p['suite'] != 'ml100k' for p in pts)} points.")  # fmt: skip
    if "synthetic-0.0" in res["suites"]:
        flagged = [f"{x['task']} ({'flagged' if x['flagged'] else 'not flagged'}, verdict {x['verdict']})"
                   for x in s["losers_at_0"]]  # fmt: skip
        lines.append("- Relatedness 0.0, tasks that measurably lose (difference beyond the seed spread): "
                     + (", ".join(flagged) if flagged else "none in this measurement") + "; the advisor ran no full unified run.")  # fmt: skip
    lines.append(
        f"- Advisor wall time / measurement wall time: worst {s['max_cost_ratio']:.1%} (target ≤ 10%)."
    )
    refs = {
        n: c["advise_seconds"] / c["reference_seconds"]
        for n, c in res["costs"].items()
        if "reference_seconds" in c
    }
    if refs:
        lines.append(f"- Against the committed consolidation reports' full protocol (`reports/*/consolidation.json`, "
                     f"its grid and seeds, run earlier): worst {max(refs.values()):.1%} ("
                     + ", ".join(f"{n} {r:.1%}" for n, r in refs.items()) + ").")  # fmt: skip
    lines += ["", "## Points", "",
              "| suite | task | predicted benefit | verdict | alignment | sign | short-run metric | predicted lift "
              "| unified | bespoke | lift | beyond spread |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in pts:
        short = "n/a" if p.get("short_run") is None else f"{p['short_run']:.4f}"
        lift = "n/a" if p.get("predicted_lift") is None else f"{p['predicted_lift']:+.3f}"
        align = "n/a" if p.get("alignment") is None else f"{p['alignment']:.3f}"
        lines.append(f"| {p['suite']} | {p['task']} | {p['predicted']:+.3f} ± {p['stderr']:.3f} | {p['verdict']} | "
                     f"{align} | {'gains' if predicts_gain(p) else 'loses'} | {short} | {lift} | {p['unified']:.4f} | {p['bespoke']:.4f} | {p['lift']:+.1%} | "
                     f"{'yes' if p['clear'] else 'no'} |")  # fmt: skip
    lines += ["", "## Cost", "", "| suite | advisor, s | measurement, s | ratio | advisor steps / unified run steps |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, c in res["costs"].items():
        lines.append(f"| {name} | {c['advise_seconds']:.1f} | {c['measure_seconds']:.1f} | "
                     f"{c['advise_seconds'] / c['measure_seconds']:.1%} | {c['advise_steps']} / {c['full_run_steps']} |")  # fmt: skip
    lines += ["", "The advisor's time starts with the unified data set prepared, which the measurement's unified runs "
              "then read too, so neither side pays for it; the measurement's is `run_suite`'s wall time (sweep, "
              "the bespoke data sets' preparation, seeds, test evaluation, footprint).", "",
              "![predicted benefit against measured lift](validation.png)", ""]  # fmt: skip
    (out / "validation.md").write_text("\n".join(lines))


def write_scatter(res: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in res["suites"]:
        ps = [p for p in res["points"] if p["suite"] == name]
        ax.plot([ranking_score(p) for p in ps], [100 * p["lift"] for p in ps], "o", label=name, markersize=5)
        for p in ps:
            ax.annotate(
                p["task"],
                (ranking_score(p), 100 * p["lift"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    s = res["summary"]
    ax.set_title(f"Spearman {s['spearman']:+.2f} over {s['n']} points", fontsize=9)
    ax.set_xlabel("advisor: predicted relative lift (benefit x headroom)", fontsize=8)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("symlog", linthresh=10)  # MovieLens lifts run to +280%, the synthetic ones to +17%
    ax.set_ylabel("measured lift of unified over bespoke, % (test NDCG@10; log beyond 10%)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
