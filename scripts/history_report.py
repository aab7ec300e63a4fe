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
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the module runs
    spec.loader.exec_module(mod)
    return mod


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
    args = ap.parse_args(argv)
    ab = _load("ablations")
    cr = ab.cr
    suite = ab.suites(args)[args.suite]
    pinned, _ = ab.pins(suite)
    lr, size = args.lr or ab.LR, args.size or ab.SIZE
    t0 = time.perf_counter()
    runs: Dict[str, List[Dict]] = {}
    for name, extra in variants(args.poolings).items():
        for seed in args.seeds:
            d = Path(args.work) / args.suite / f"{name.replace(', ', '-').replace(' ', '_')}-s{seed}"
            overrides = [f"{k}={v}" for k, v in pinned.items()] + args.set + extra
            with contextlib.redirect_stdout(io.StringIO()):
                m = cr.train(suite, None, lr, size, seed, d, args, extra=overrides)
                res = cr.evaluate(d, "test", (suite.headline,))
            by = res["protocols"][suite.headline]
            runs.setdefault(name, []).append({
                "seed": seed, "wall_seconds": m["wall_seconds"], "parameters": m["parameters"],
                "test": by["model"], "popularity": by.get("popularity", {}),
            })  # fmt: skip
            print(f"{name:<22} seed {seed}: {m['wall_seconds']:6.1f}s  " + " ".join(
                f"{t}={s['ndcg@10']:.4f}" for t, s in by["model"].items()), flush=True)  # fmt: skip
    out = Path(args.out) / args.suite
    out.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - t0) / 60
    res = {"suite": args.suite, "seeds": args.seeds, "pinned": pinned, "epochs": suite.epochs, "lr": lr,
           "size": cr.SIZES[size], "set": args.set, "minutes": round(minutes, 1), "runs": runs}  # fmt: skip
    (out / "history.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    (out / "history.md").write_text(render(res, argv))
    print(f"wrote {out / 'history.md'} in {minutes:.1f} min")


def render(res: Dict, argv) -> str:
    runs = res["runs"]
    base = runs["no history"]
    tasks = list(base[0]["test"])

    def per_seed(rs, task, metric="ndcg@10"):
        return [r["test"][task][metric] for r in rs]

    def cell(xs):
        return f"{np.mean(xs):.4f} ± {np.std(xs):.4f}"

    lines = [
        f"# The user's history: {res['suite']}",
        "",
        f"Generated by `python scripts/history_report.py {' '.join(argv or []) or '--raw-dir data/ml-100k'}` in "
        f"{res['minutes']} min. Mean ± std over seeds {res['seeds']}; test split, "
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
              "| variant | " + " | ".join(tasks) + " | home ratio |", "|---|" + "---|" * (len(tasks) + 1)]  # fmt: skip
    for name, rs in runs.items():
        if name == "no history":
            continue
        ratio = np.mean(per_seed(rs, tasks[0])) / max(np.mean(per_seed(base, tasks[0])), 1e-12)
        lines.append(f"| {name} | " + " | ".join(paired(per_seed(base, t), per_seed(rs, t)) for t in tasks)
                     + f" | {ratio:.2f}× |")  # fmt: skip
    lines += ["", "Recall@10 and MRR are in `history.json`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
