"""``python -m unirec.evaluate RUN_OR_ARTIFACT``: both protocols on a training run's checkpoint or an
exported artifact, for any split, beside popularity (and, with ``--baselines``, the baselines of
:mod:`unirec.baselines`); writes JSON (see :func:`main`).

- **sampled** (:mod:`unirec.sampled`): each request's logged candidates.
- **full** (:mod:`unirec.ranking`): the whole catalogue, minus what the user engaged with earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from unirec.baselines import baseline_digest, baseline_scorers
from unirec.data.features import Featurizer
from unirec.ranking import full_ranking, model_matrix_scorer, popularity_matrix_scorer
from unirec.sampled import evaluate, model_scorer, popularity_scorer
from unirec.schema import FeatureSpec


@dataclass
class Loaded:
    """A trained model with what evaluating it needs."""

    model: torch.nn.Module
    featurizer: Featurizer
    features: Path
    checkpoint: str


def load(source: Path, checkpoint: str = "best", data: Optional[Path] = None) -> Loaded:
    """A training run directory (its checkpoint ``checkpoint``) or an exported artifact (``manifest.json``),
    with the features directory it was trained on (``data`` overrides it: a prepared ``.../features``)."""
    from safetensors.torch import load_file

    from unirec.export import (
        METRICS,
        SPEC,
        WEIGHTS,
        ArtifactError,
        checkpoint_dir,
        model_config_from_run,
        read_json,
    )
    from unirec.model import MultiTaskRanker

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither a training run directory nor an exported artifact")
    meta = read_json(source / METRICS) if (source / METRICS).exists() else {}
    features = Path(data) if data else Path(meta["features"]) if "features" in meta else None
    if features is None:
        raise ValueError(f"{source / METRICS} does not name the features directory; pass --data")
    if not (features / SPEC).exists():
        raise FileNotFoundError(f"{features / SPEC} is missing: --data must be a prepared features directory")
    if (source / "manifest.json").exists():
        from unirec.serve.scorer import load_artifact

        art = load_artifact(source)
        if art.spec != FeatureSpec.load(features / SPEC):
            raise ArtifactError(f"{source} was not trained on {features}: their feature_spec.json differ")
        return Loaded(art.model, art.featurizer, features, f"artifact {art.version}")
    ckpt = checkpoint_dir(source, checkpoint)
    featurizer = Featurizer.load(features)
    model = MultiTaskRanker(featurizer.spec, model_config_from_run(source))
    model.load_state_dict(load_file(str(ckpt / WEIGHTS)))
    return Loaded(model.eval(), featurizer, features, ckpt.name)


def run(
    source: Path,
    split: str = "test",
    protocols: Sequence[str] = ("full", "sampled"),
    checkpoint: str = "best",
    data: Optional[Path] = None,
    k: int = 10,
    batch_size: int = 8192,
    seed: int = 0,
    popularity: bool = True,
    baselines: bool = False,
    baseline_cache: Optional[Path] = None,
    tasks: Optional[Sequence[str]] = None,
) -> Dict:
    """Both protocols for the model (and the popularity baseline) on ``split``; a JSON-ready dict.
    ``baselines``: also pooled popularity and BPR-MF in the full protocol (:mod:`unirec.baselines`);
    ``baseline_cache``: a directory where their figures are kept under :func:`baseline_digest`, and taken
    from when the digest is there; ``tasks``: only these tasks (default every task of the run; the sampled
    popularity's tie-breaking jitter is drawn in task order, so its figures move in the fourth decimal)."""
    loaded = load(source, checkpoint, data)
    spec, feats = loaded.featurizer.spec, loaded.features
    unknown = sorted(set(tasks or ()) - set(spec.tasks))
    if unknown:
        raise ValueError(f"tasks {unknown} are not tasks of {source}; its tasks: {sorted(spec.tasks)}")
    out: Dict = {"source": str(source), "checkpoint": loaded.checkpoint, "features": str(feats),
                 "split": split, "k": k, "protocols": {}, "seconds": {}}  # fmt: skip
    for protocol in protocols:
        t0 = time.perf_counter()
        if protocol == "full":
            cats = {c: loaded.featurizer.catalogue_ids(c) for c in spec.candidates}
            scorers = {"model": model_matrix_scorer(loaded.model, loaded.featurizer, cats)}
            if popularity:
                scorers["popularity"] = popularity_matrix_scorer(feats, loaded.featurizer, cats, seed)
            full = full_ranking(scorers, feats.parent, spec, split, cats, k, tasks=tasks)
            if baselines:
                full.update(_baselines(feats, loaded.featurizer, cats, split, k, seed, baseline_cache, out))
            out["protocols"]["full"] = full
            out.setdefault("baselines", {})  # the baselines' chosen settings (set by _baselines)
        elif protocol == "sampled":
            score = model_scorer(loaded.model, torch.device("cpu"), False)
            res = {"model": evaluate(score, feats, spec, split, batch_size, tasks=tasks)}
            if popularity:
                res["popularity"] = evaluate(
                    popularity_scorer(feats, spec, seed), feats, spec, split, batch_size, tasks=tasks
                )
            out["protocols"]["sampled"] = res
        else:
            raise ValueError(f"unknown protocol {protocol!r}: use full or sampled")
        out["seconds"][protocol] = round(time.perf_counter() - t0, 2)
    return out


def _baselines(feats, featurizer, cats, split, k, seed, cache: Optional[Path], out: Dict) -> Dict:
    """The baselines' full-ranking figures (and, into ``out["baselines"]``, their chosen settings), from
    ``cache`` when it holds this data's :func:`baseline_digest`."""
    path = None
    if cache is not None:
        path = Path(cache) / f"baselines-{baseline_digest(feats, featurizer, cats, split, k, seed)}.json"
        if path.exists():
            kept = json.loads(path.read_text())
            out["baselines"] = kept["chosen"]
            out["baselines_from"] = str(path)
            return kept["figures"]
    scorers = baseline_scorers(feats, featurizer, cats, seed)
    figures = full_ranking(scorers, feats.parent, featurizer.spec, split, cats, k)
    out["baselines"] = {n: s.chosen for n, s in scorers.items() if getattr(s, "chosen", None)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of one report may write it at once
        tmp.write_text(json.dumps({"chosen": out["baselines"], "figures": figures}, indent=2, sort_keys=True))
        tmp.replace(path)
    return figures


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """``python -m unirec.evaluate RUN_OR_ARTIFACT [--split test] [--protocol full sampled] [--out FILE]``."""
    from unirec.report import format_table

    ap = argparse.ArgumentParser(prog="python -m unirec.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="training run directory or exported artifact (vNNNNNN)")
    ap.add_argument(
        "--checkpoint", default="best", help="of a run: best (default), best:<task>, latest or step-N"
    )
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ap.add_argument("--protocol", nargs="+", default=["full", "sampled"], choices=("full", "sampled"))
    ap.add_argument("--data", type=Path, help="features directory (default: the one the run was trained on)")
    ap.add_argument("--k", type=int, default=10, help="cut-off of ndcg@K and recall@K (full protocol)")
    ap.add_argument("--no-popularity", action="store_true", help="skip the popularity baseline")
    ap.add_argument("--baselines", action="store_true",
                    help="full protocol: also popularity over all canvases and BPR-MF (tuned on valid)")  # fmt: skip
    ap.add_argument("--tasks", nargs="+", help="only these tasks (default: every task of the run)")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    try:
        res = run(args.source, args.split, args.protocol, args.checkpoint, args.data, args.k,
                  popularity=not args.no_popularity, baselines=args.baselines, tasks=args.tasks)  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        ap.exit(2, f"error: {e}\n")
    for protocol, by in res["protocols"].items():
        base = by.get("popularity", by["model"])
        print(format_table(by["model"], base, f"{args.split} {protocol}"), file=sys.stderr)
        for name in sorted(set(by) - {"model", "popularity"}):
            cells = ", ".join(f"{t} {m[f'ndcg@{args.k}']:.4f}" for t, m in sorted(by[name].items()))
            print(f"{name} ndcg@{args.k}: {cells}", file=sys.stderr)
    text = json.dumps(res, indent=2, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return res


if __name__ == "__main__":
    main()
