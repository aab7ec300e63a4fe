"""What the user's history buys: the same recipe with and without the history field, per pooling, per task.

    python scripts/fetch_movielens.py data/ml-100k
    python scripts/history_report.py --raw-dir data/ml-100k            # 3 seeds, about 15 min on 2 cores
    python scripts/history_report.py --suite synthetic --poolings mean

Every run uses the ablation report's recipe (scripts/ablations.py: its learning rate, size, batch and
epochs, validation every epoch, the checkpoint with the best validation mean ndcg@10) and the pinned core
default; the variants differ only in ``data.history.enabled`` and ``model.sequence_pooling``. Test, full
ranking on MovieLens (the sampled protocol on the synthetic canvases). Writes
``reports/<suite>/history.{md,json}``; finished runs under ``--work`` are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from unirec.experiments import ablations
from unirec.experiments.runs import evaluate as evaluate_run
from unirec.experiments.runs import train as train_run
from unirec.experiments.suites import SIZES


def variants(poolings: List[str]) -> Dict[str, List[str]]:
    out = {"no history": ["data.history.enabled=false"]}
    for p in poolings:
        out[f"history, {p}"] = ["data.history.enabled=true", f"model.sequence_pooling={p}"]
    return out


def paired(a: List[float], b: List[float]) -> str:
    """Mean paired difference (b - a) over seeds and how many seeds improve."""
    d = np.asarray(b) - np.asarray(a)
    return f"{d.mean():+.4f} ({(d > 0).sum()}/{len(d)} seeds up)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="ml100k", choices=("ml100k", "synthetic"))
    ap.add_argument("--raw-dir", help="MovieLens-100K directory (scripts/fetch_movielens.py)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--poolings", nargs="+", default=["mean", "attention", "transformer"])
    ap.add_argument("--epochs", type=int, help="default: the ablation report's")
    ap.add_argument("--lr", type=float, help="default: the ablation report's")
    ap.add_argument("--size", choices=("S", "M"), help="default: the ablation report's (S)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--work", default="runs/history")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--cache-dir")
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch (the test)")
    ap.add_argument("--render", action="store_true", help="only rewrite history.md from history.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    out = Path(args.out) / args.suite
    if args.render:
        (out / "history.md").write_text(render(json.loads((out / "history.json").read_text())))
        return
    suite = ablations.suites(args)[args.suite]
    pinned, _ = ablations.pins(suite)
    lr, size = args.lr or ablations.LR, args.size or ablations.SIZE
    t0 = time.perf_counter()
    runs: Dict[str, List[Dict]] = {}
    for name, extra in variants(args.poolings).items():
        for seed in args.seeds:
            d = Path(args.work) / args.suite / f"{name.replace(', ', '-').replace(' ', '_')}-s{seed}"
            overrides = [f"{k}={v}" for k, v in pinned.items()] + args.set + extra
            with contextlib.redirect_stdout(io.StringIO()):
                m = train_run(suite, None, lr, size, seed, d, args, extra=overrides)
                res = evaluate_run(d, "test", (suite.headline,))
            by = res["protocols"][suite.headline]
            runs.setdefault(name, []).append({
                "seed": seed, "wall_seconds": m["wall_seconds"], "parameters": m["parameters"],
                "test": by["model"], "popularity": by.get("popularity", {}),
            })  # fmt: skip
            print(f"{name:<22} seed {seed}: {m['wall_seconds']:6.1f}s  " + " ".join(
                f"{t}={s['ndcg@10']:.4f}" for t, s in by["model"].items()), flush=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - t0) / 60
    res = {"suite": args.suite, "seeds": args.seeds, "pinned": pinned, "epochs": suite.epochs, "lr": lr,
           "size": SIZES[size], "set": args.set, "minutes": round(minutes, 1), "runs": runs,
           "command": " ".join(["python scripts/history_report.py", *argv])}  # fmt: skip
    (out / "history.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    (out / "history.md").write_text(render(res))
    print(f"wrote {out / 'history.md'} in {minutes:.1f} min")


def render(res: Dict) -> str:
    runs = dict(sorted(res["runs"].items(), key=lambda kv: kv[0] != "no history"))  # the reference first
    base = runs["no history"]
    tasks = list(base[0]["test"])

    def per_seed(rs, task, metric="ndcg@10"):
        return [r["test"][task][metric] for r in rs]

    def cell(xs):
        return f"{np.mean(xs):.4f} ± {np.std(xs):.4f}"

    lines = [
        f"# The user's history: {res['suite']}",
        "",
        f"Generated by `{res['command']}` in {res['minutes']} min (OMP_NUM_THREADS=2, other work sharing the "
        "cores part of the time, so wall seconds are only indicative). "
        f"Mean ± std over seeds {res['seeds']}; test split, "
        + (
            "full ranking (all items minus the user's train and valid items, as the split excludes them)."
            if res["suite"] == "ml100k"
            else "logged impressions."
        ),
        "",
        f"Recipe (every run): lr {res['lr']}, embedding {res['size']['embedding_dim']}, hidden "
        f"{res['size']['hidden_dim']}, {res['epochs']} epochs, best validation mean ndcg@10; pinned "
        + ", ".join(f"`{k}={v}`" for k, v in res["pinned"].items())
        + "".join(f", `{o}`" for o in res.get("set", []))
        + ". The variants differ only in `data.history.enabled` and `model.sequence_pooling`.",
        "",
        "## ndcg@10 per task",
        "",
        "| variant | " + " | ".join(tasks) + " | train s | parameters |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for name, rs in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(per_seed(rs, t)) for t in tasks)
                     + f" | {np.median([r['wall_seconds'] for r in rs]):.1f} | {rs[0]['parameters']:,} |")  # fmt: skip
    if base[0]["popularity"]:
        lines.append("| popularity (task's own train counts) | " + " | ".join(
            cell([r["popularity"][t]["ndcg@10"] for r in base]) for t in tasks) + " | | |")  # fmt: skip
    lines += ["", "## Against no history: paired difference of ndcg@10 (same seed, same data)", "",
              "| variant | " + " | ".join(f"{t} (ratio of means)" for t in tasks) + " |",
              "|---|" + "---|" * len(tasks)]  # fmt: skip
    for name, rs in runs.items():
        if name == "no history":
            continue
        cells = []
        for t in tasks:
            ratio = np.mean(per_seed(rs, t)) / max(np.mean(per_seed(base, t)), 1e-12)
            cells.append(f"{paired(per_seed(base, t), per_seed(rs, t))}, {ratio:.2f}×")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "With 3 seeds a paired sign test cannot go below p = 0.125 (one-sided): read \"3/3 seeds up\" "
              "with the size of the difference against the std, not as significance on its own."]  # fmt: skip
    lines += ["", "Recall@10 and MRR are in `history.json`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
