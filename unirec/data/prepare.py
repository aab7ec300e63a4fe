"""The offline data path end to end: raw canvas logs -> labeled dataset -> feature shards.

Layout of a prepared data set (one directory, keyed by a hash of everything that shapes it)::

    raw/                 generated or derived logs (synthetic and movielens data only)
    labeled/split=<s>/task=<t>/*.parquet
    rejects/task=<t>/*.parquet  +  rejects.json  (counts per task and reason)
    features/feature_spec.json, vocab/, candidates/<type>.parquet, popularity.parquet,
             history.parquet (with data.history: every user's latest history, the serving snapshot),
             <split>/<task>/*.parquet

Any number of files per directory: the local engine (``data.engine=local``, :mod:`unirec.data.engine_local`)
and Spark (``data.engine=spark``, :mod:`unirec.data.engine_spark`) write the same rows in different files.

A directory is complete once ``_SUCCESS`` exists; it is written under a temporary name and renamed, so an
interrupted preparation is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import pyarrow as pa

from unirec.config import DataConfig, Engine, TaskConfig
from unirec.data import engine_local
from unirec.data.plan import Plan, raw_files, read_raw, resolve
from unirec.schema import FeatureSpec, used_candidates, validate_tasks

__all__ = ["build", "dataset_key", "popularity_counts", "prepare", "raw_files", "read_raw"]

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
# Part of the cache key: bump when label or feature preparation changes what it writes.
PREPARE_VERSION = 7


def cache_root(data: DataConfig) -> Path:
    root = data.cache_dir or os.environ.get("UNIREC_CACHE") or Path.home() / ".cache" / "unirec"
    return Path(root).expanduser()


def dataset_key(data: DataConfig, tasks: Mapping[str, TaskConfig], seed: int) -> str:
    """A short hash of every setting and raw input that changes the prepared data (not the model or
    trainer): the same raw directory with a changed file is another data set (see :func:`raw_fingerprint`)."""
    shaping = _plain(asdict(data))
    # Where the cache lives, and what prepares it and how, do not change what is in it: the engines prepare
    # the same rows (tests/integration/test_spark_engine.py), so a set prepared by Spark serves a local run.
    for key in ("cache_dir", "engine", "spark", "partition_rows"):
        shaping.pop(key)
    tasks_ = {k: _plain(asdict(v)) for k, v in sorted(tasks.items())}
    for t in tasks_.values():
        t.pop("borrow")  # which rows train a head is the trainer's business, not the data's
    blob = json.dumps(
        {
            "data": shaping,
            "tasks": tasks_,
            "seed": seed,
            "version": PREPARE_VERSION,
            "raw": raw_fingerprint(data, tasks),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def raw_fingerprint(data: DataConfig, tasks: Mapping[str, TaskConfig]) -> Dict[str, object]:
    """File -> (size, mtime, content hash) of every raw file preparation reads: the MovieLens source files
    (data=movielens) or the selected tasks' logs, candidate tables and history source (data.name=raw).
    The synthetic data set is generated from its config, which the key holds already. A missing file is
    None here; reading it fails with its name later."""
    if data.name == "synthetic" or not data.raw_dir:
        return {}
    raw_dir = Path(data.raw_dir).expanduser()
    if data.name == "movielens":
        from unirec.data.movielens import source_files

        paths = source_files(raw_dir)
    else:
        sources = [t.adapter.source for t in tasks.values()]
        sources += [c.table for c in used_candidates(tasks, data.candidates).values()]
        if data.history.enabled and data.history.source:
            sources.append(data.history.source)
        paths = [resolve(raw_dir, s) for s in sorted(set(sources))]
    out: Dict[str, object] = {}
    for p in paths:
        files = raw_files(p) if p.exists() else []
        out[str(p)] = [_file_fingerprint(Path(f)) for f in files] if files else None
    return out


def _file_fingerprint(path: Path) -> list:
    """[name, size, mtime_ns, sha256 of the parquet footer, or of the whole file if it is not parquet].

    A parquet footer holds every row group's size, offsets and column statistics, so it changes with the
    data, and reading it costs the same for a 1 kB and a 10 GB log."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(max(st.st_size - 8, 0))
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] == b"PAR1" and 12 + length <= st.st_size:
            f.seek(st.st_size - 8 - length)
            h.update(f.read(length))
        else:
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return [path.name, st.st_size, st.st_mtime_ns, h.hexdigest()]


def prepare(data: DataConfig, tasks: Mapping[str, TaskConfig], seed: int, force: bool = False) -> Path:
    """Prepare (or reuse) the data set for these tasks; returns its features directory."""
    validate_tasks(tasks, data.candidates)
    key = dataset_key(data, tasks, seed)
    final = cache_root(data) / f"{data.name}-{key}"
    if (final / SUCCESS).exists() and not force:
        log.info("reusing prepared data %s", final)
        return final / "features"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        raw_dir = _raw_dir(data, tmp, seed)
        build(raw_dir, tmp, data, tasks, seed)
        (tmp / SUCCESS).write_text(key)
        if force and final.exists():
            shutil.rmtree(final)
        try:  # atomic; a directory another process put there meanwhile (complete: it renamed it whole) stays
            os.replace(tmp, final)
        except OSError:
            if not (final / SUCCESS).exists():
                raise
            log.info("another process prepared %s meanwhile; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "features"


def build(
    raw_dir: Path,
    out: Path,
    data: DataConfig,
    tasks: Mapping[str, TaskConfig],
    seed: int,
    now: Optional[float] = None,
) -> Dict:
    """Labels then features, into ``out``, by ``data.engine``; returns the reject counts per task and reason.

    ``now`` (epoch s, default: read once here) anchors the horizon of event times (``data.max_future_s``)."""
    plan = Plan.make(raw_dir, data, tasks, seed, now)
    if plan.latest is not None:
        print(
            f"labels  events after {plan.latest} (epoch s; data.max_future_s past this preparation) are rejected"
        )
    if data.engine == Engine.spark:
        from unirec.data import engine_spark  # pyspark and Java only where asked for

        return engine_spark.build(raw_dir, out, plan)
    return engine_local.build(raw_dir, out, plan)


def popularity_counts(pop: pa.Table, spec: FeatureSpec) -> Dict[str, np.ndarray]:
    """Task -> train engagement count per candidate id index, from a :func:`popularity` table."""
    names = pop["task"].to_numpy(zero_copy_only=False)
    index, count = pop["index"].to_numpy().astype(np.int64), pop["count"].to_numpy().astype(np.float64)
    out = {}
    for task, t in spec.tasks.items():
        id_field = spec.candidates[t.candidate].id_field
        counts = np.zeros(spec.table_of(id_field).size, dtype=np.float64)
        mine = names == task
        counts[index[mine]] = count[mine]
        out[task] = counts
    return out


def _raw_dir(data: DataConfig, tmp: Path, seed: int) -> Path:
    if data.name == "synthetic":
        from unirec.data.synthetic import generate

        summary = generate(data.synthetic, tmp / "raw")
        _print_summary("synthetic", summary)
        return tmp / "raw"
    if data.name == "movielens":
        # data.raw_dir holds MovieLens-100K (either layout); the canvas logs are derived into the cache.
        from unirec.data.movielens import derive, load

        if not data.raw_dir:
            raise ValueError(
                "data=movielens needs data.raw_dir: a MovieLens-100K directory (GroupLens or RecBole "
                "layout), e.g. from `python scripts/fetch_movielens.py DIR`"
            )
        summary = derive(load(data.raw_dir), tmp / "raw", seed, data.movielens)
        _print_summary("movielens", summary)
        return tmp / "raw"
    if not data.raw_dir:
        raise ValueError(f"data.name={data.name!r} needs data.raw_dir: the directory of the raw canvas logs")
    return Path(data.raw_dir).expanduser()


def _print_summary(name: str, summary: Dict) -> None:
    rows = ", ".join(f"{k}={v['rows']:,} rows" for k, v in summary["canvases"].items())
    print(f"{name} canvases: {summary['items']} items, {summary['users']} users, {rows}")


def _plain(obj):
    """Enums to their values so the hash does not depend on how a config was built."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return getattr(obj, "value", obj)


def main(argv: Optional[list] = None) -> None:
    """``python -m unirec.data.prepare [overrides]``: prepare (or find) the data set of a training config,
    without training; prints the features directory. Takes the same Hydra overrides as ``unirec.train``."""
    import resource
    import sys

    from unirec.config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose(sys.argv[1:] if argv is None else argv)
    features = prepare(cfg.data, cfg.task, cfg.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"features: {features}\npeak RSS: {peak:.0f} MB")


if __name__ == "__main__":
    main()
