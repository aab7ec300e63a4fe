"""Mean ± std over seeds of ``python -m unirec.evaluate`` results: one markdown table per protocol.

    python scripts/seed_table.py runs/*/eval-test.json                 # every scorer, ndcg@10 and recall@10
    python scripts/seed_table.py runs/*/eval-test.json --metrics ndcg@10

Each file is one seed's JSON (``python -m unirec.evaluate RUN --out FILE``, or ``unirec.evaluate.run``);
the full protocol's scorers (the model, popularity, and with ``--baselines`` pooled popularity and BPR-MF)
and the sampled protocol's are listed task by task, with the model's ratio to the strongest baseline of
each task in the full protocol.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List


def cell(xs: List[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def tables(results: List[Dict], metrics: List[str]) -> str:
    lines = []
    for protocol in ("full", "sampled"):
        runs = [r["protocols"][protocol] for r in results if protocol in r["protocols"]]
        if not runs:
            continue
        scorers = list(runs[0])
        tasks = sorted({t for s in scorers for t in runs[0][s]})
        lines += [f"### {protocol} protocol, {len(runs)} seed{'s' if len(runs) > 1 else ''}", ""]
        for m in metrics:
            head = ["task", *(f"{s} {m}" for s in scorers)]
            if protocol == "full" and len(scorers) > 1:
                head.append("model / strongest baseline")
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for t in tasks:
                row = [t]
                means = {}
                for s in scorers:
                    xs = [r[s][t][m] for r in runs if t in r[s] and m in r[s][t]]
                    row.append(cell(xs) if xs else "n/a")
                    if xs:
                        means[s] = statistics.mean(xs)
                if protocol == "full" and len(scorers) > 1:
                    base = max((v, s) for s, v in means.items() if s != "model")
                    row.append(f"{means['model'] / base[0]:.2f}x ({base[1]})")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@10"])
    args = ap.parse_args(argv)
    results = []
    for f in args.files:
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"{f}: {e}")
    print(tables(results, args.metrics))


if __name__ == "__main__":
    main()
