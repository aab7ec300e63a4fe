"""Reading a prepared data set as order-insensitive rows, to compare two preparations of the same data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from unirec.data.labels import SPLITS


def rows(directory: Path) -> List[str]:
    """Every row of a directory's parquet files, as sorted JSON (column order and file layout ignored)."""
    files = sorted(Path(directory).glob("*.parquet"))
    assert files, f"no parquet files in {directory}"
    t = pa.concat_tables([pq.read_table(f) for f in files])
    return _canonical(t)


def _canonical(t: pa.Table) -> List[str]:
    cols = sorted(t.column_names)
    return sorted(json.dumps([r[c] for c in cols], default=str) for r in t.select(cols).to_pylist())


def contents(root: Path) -> Dict[str, object]:
    """What a preparation holds, by name: the spec, vocabularies and reject counts as text, then per split
    and task the multiset of labeled and featurized rows, the rejects, popularity and history snapshot."""
    feat = root / "features"
    out: Dict[str, object] = {
        "feature_spec.json": (feat / "feature_spec.json").read_text(),
        "rejects.json": json.loads((root / "rejects.json").read_text()),
    }
    out.update({f"vocab/{v.name}": v.read_text() for v in sorted((feat / "vocab").glob("*.json"))})
    tasks = sorted(p.name for p in (feat / "train").iterdir())
    for s in SPLITS:
        for t in tasks:
            out[f"features/{s}/{t}"] = rows(feat / s / t)
            out[f"labeled/{s}/{t}"] = rows(root / "labeled" / f"split={s}" / f"task={t}")
            out[f"schema/{s}/{t}"] = pq.read_schema(next((feat / s / t).glob("*.parquet"))).to_string()
    for d in sorted((root / "rejects").iterdir()):
        out[f"rejects/{d.name}"] = rows(d)
    for f in ("popularity.parquet", "history.parquet"):
        if (feat / f).exists():
            out[f] = _canonical(pq.read_table(feat / f))
    return out


def differences(a: Dict[str, object], b: Dict[str, object]) -> List[str]:
    """The keys whose values differ (or that only one side has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
