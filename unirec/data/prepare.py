"""The offline data path end to end: raw canvas logs -> labeled dataset -> feature shards.

Layout of a prepared data set (one directory, keyed by a hash of everything that shapes it)::

    raw/                 generated or derived logs (synthetic and movielens data only)
    labeled/split=<s>/task=<t>/part-00000.parquet
    rejects/task=<t>/part-00000.parquet  +  rejects.json  (counts per task and reason)
    features/feature_spec.json, vocab/, candidates/<type>.parquet, popularity.parquet,
             history.parquet (with data.history: every user's latest history, the serving snapshot),
             <split>/<task>/part-*.parquet

A directory is complete once ``_SUCCESS`` exists; it is written under a temporary name and renamed, so an
interrupted preparation is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from unirec.config import CandidateConfig, DataConfig, HistoryConfig, TaskConfig
from unirec.data import history, labels
from unirec.data.features import Featurizer, Imputer, fit, save_vocabs
from unirec.schema import (
    FeatureSpec,
    active_rules,
    table_name,
    unified_context,
    used_candidates,
    validate_tasks,
    with_history,
)

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
# Part of the cache key: bump when label or feature preparation changes what it writes.
PREPARE_VERSION = 6


def cache_root(data: DataConfig) -> Path:
    root = data.cache_dir or os.environ.get("UNIREC_CACHE") or Path.home() / ".cache" / "unirec"
    return Path(root).expanduser()


def dataset_key(data: DataConfig, tasks: Mapping[str, TaskConfig], seed: int) -> str:
    """A short hash of every setting and raw input that changes the prepared data (not the model or
    trainer): the same raw directory with a changed file is another data set (see :func:`raw_fingerprint`)."""
    shaping = _plain(asdict(data))
    shaping.pop("cache_dir")  # where the cache lives does not change what is in it
    tasks_ = {k: _plain(asdict(v)) for k, v in sorted(tasks.items())}
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
        paths = [_resolve(raw_dir, s) for s in sorted(set(sources))]
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
        if (final / SUCCESS).exists() and not force:
            log.info("another process prepared %s meanwhile; using it", final)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
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
    """Labels then features, into ``out``; returns the reject counts per task and reason.

    ``now`` (epoch s, default: read once here) anchors the horizon of event times (``data.max_future_s``)."""
    now = time.time() if now is None else now
    latest = None if data.max_future_s is None else int(now) + data.max_future_s
    if latest is not None:
        print(
            f"labels  events after {latest} (epoch s; data.max_future_s past this preparation) are rejected"
        )
    candidates = used_candidates(tasks, data.candidates)
    tasks = with_history(tasks, data.history, candidates)
    ctx_fields = unified_context(tasks)
    catalogues = {c: read_raw(_resolve(raw_dir, cfg.table)) for c, cfg in candidates.items()}
    examples: Dict[str, pa.Table] = {}
    reject_counts: Dict[str, Dict[str, int]] = {}
    for name, task in sorted(tasks.items()):
        cat_ids = catalogues[task.candidate][candidates[task.candidate].key].combine_chunks()
        raw = read_raw(_resolve(raw_dir, task.adapter.source))
        examples[name], rejects = labels.labeled_examples(raw, task, cat_ids, ctx_fields, seed, latest)
        reject_counts[name] = labels.count_reasons(rejects)
        if examples[name].num_rows == 0:  # say so here, before the time split blames the logs' span
            raise ValueError(
                f"task {name} has no examples: every one of the {raw.num_rows:,} rows of its log "
                f"{task.adapter.source!r} was rejected {reject_counts[name]}; fix the log or task.{name}.adapter"
            )
        _write(rejects, out / "rejects" / f"task={name}" / "part-00000.parquet")
        print(
            f"labels  {name:<10} raw={raw.num_rows:>11,} rejected={rejects.num_rows:>9,}  {reject_counts[name]}"
        )
    impute = {name: active_rules(t, ctx_fields) if data.impute else {} for name, t in tasks.items()}
    imputer = Imputer(
        {t.id: impute[name] for name, t in tasks.items()},
        {k: v.kind for k, v in ctx_fields.items()},
        catalogues,
        {c: cfg.key for c, cfg in candidates.items()},
        {f: (c, fc.column) for c, cfg in candidates.items() for f, fc in cfg.fields.items()},
    )
    examples = {name: imputer(t) for name, t in examples.items()}
    snapshot = None
    history_on = any(data.history.field in t.context for t in tasks.values())  # see with_history
    if history_on:
        events = history_events(raw_dir, data.history, examples, tasks, candidates)
        for name, t in examples.items():
            if data.history.field in tasks[name].context:
                examples[name] = _attach_history(t, events, data.history)
        snapshot = history.history_snapshot(events, key="user", item="item", max_len=data.history.max_len)
        print(f"history {data.history.field}: {events.num_rows:,} engagements of {snapshot.num_rows:,} users")
    cutoffs = labels.time_cutoffs(list(examples.values()), data.split)
    splits: Dict[str, Dict[str, pa.Table]] = {s: {} for s in labels.SPLITS}
    for name, task in sorted(tasks.items()):
        by_split = labels.split_by_time(examples.pop(name), cutoffs)
        by_split["train"] = labels.downsample(by_split["train"], task, seed)
        _check_split_sizes(name, by_split, cutoffs)
        for s, t in by_split.items():
            splits[s][name] = t
            _write(t, out / "labeled" / f"split={s}" / f"task={name}" / "part-00000.parquet")
        print(f"split   {name:<10} " + " ".join(f"{s}={t.num_rows:,}" for s, t in by_split.items()))
    (out / "rejects.json").write_text(json.dumps(reject_counts, indent=2, sort_keys=True))

    spec, vocabs = fit(splits["train"], tasks, ctx_fields, candidates, catalogues, impute)
    if history_on:  # which field is the history and whose it is: the service resolves it by user
        spec = dataclasses.replace(
            spec, extras={"history": {"field": data.history.field, "key": data.history.key}}
        )
    feat = out / "features"
    feat.mkdir(parents=True, exist_ok=True)
    spec.save(feat / "feature_spec.json")
    save_vocabs(feat, spec, vocabs)
    for c, t in catalogues.items():
        _write(t, feat / "candidates" / f"{c}.parquet")
    featurizer = Featurizer(spec, vocabs, catalogues)
    for s, by_task in splits.items():
        for name, t in by_task.items():
            _write_shards(t, feat / s / name, data.rows_per_file, featurizer.examples)
    _write(popularity(splits["train"], featurizer), feat / "popularity.parquet")
    if snapshot is not None:
        _write(snapshot, feat / history.SNAPSHOT)
    return reject_counts


def history_events(
    raw_dir: Path,
    cfg: HistoryConfig,
    examples: Mapping[str, pa.Table],
    tasks: Mapping[str, TaskConfig],
    candidates: Mapping[str, CandidateConfig],
) -> pa.Table:
    """The engagements histories are made of, as columns ``user, item, timestamp[, event_order]``: the
    ``cfg.source`` file, or the positives of every task whose requests have the key and whose candidates
    carry the history table's ids (so a genre row's clicks never enter an item history)."""
    if cfg.source:
        raw = read_raw(_resolve(raw_dir, cfg.source))
        wanted = {"user": cfg.user, "item": cfg.item, "timestamp": cfg.timestamp}
        if cfg.order:
            wanted[history.ORDER] = cfg.order
        missing = [c for c in wanted.values() if c not in raw.column_names]
        if missing:
            raise KeyError(
                f"data.history.source {cfg.source!r} lacks column(s) {missing}; it has {raw.column_names}"
            )
        return pa.table({k: raw[c] for k, c in wanted.items()})
    parts = []
    for name, t in sorted(examples.items()):
        ctype = tasks[name].candidate
        holds = any(
            table_name(f, c) == cfg.table
            for f, c in candidates[ctype].fields.items()
            if c.column == candidates[ctype].key
        )
        if cfg.key not in tasks[name].context or not holds:
            continue
        pos = t.filter(pc.greater(t[labels.LABEL], 0))
        cols = {"user": pos[cfg.key], "item": pos[labels.CANDIDATE], "timestamp": pos[labels.TIMESTAMP]}
        if labels.ORDER in pos.column_names:
            cols[history.ORDER] = pos[labels.ORDER]
        parts.append(pa.table(cols))
    if not parts:
        raise ValueError(
            f"data.history: no task has {cfg.key!r} and ranks {cfg.table!r} ids; set data.history.source"
        )
    return pa.concat_tables(parts, promote_options="default")


def _attach_history(examples: pa.Table, events: pa.Table, cfg: HistoryConfig) -> pa.Table:
    """Each row's point-in-time history as the ``cfg.field`` column (see :mod:`unirec.data.history`)."""
    hist = history.point_in_time_history(
        examples, events, key="user", item="item", max_len=cfg.max_len, request_key=cfg.key
    )
    i = examples.schema.get_field_index(cfg.field)
    return examples.set_column(i, cfg.field, hist) if i >= 0 else examples.append_column(cfg.field, hist)


def _check_split_sizes(name: str, by_split: Mapping[str, pa.Table], cutoffs) -> None:
    empty = [s for s, t in by_split.items() if t.num_rows == 0]
    if empty:
        raise ValueError(
            f"task {name} has no {'/'.join(empty)} examples with the shared time cut-offs {cutoffs} (epoch s): "
            f"its logs do not span the data set's period; adjust data.split or the task's logs"
        )


def popularity(train: Mapping[str, pa.Table], featurizer: Featurizer) -> pa.Table:
    """Train engagements per (task, candidate id index): the popularity baseline's scores."""
    parts = []
    for name, t in train.items():
        ctype = featurizer.spec.tasks[name].candidate
        pos = t.filter(pc.greater(t[labels.LABEL], 0))
        id_field = featurizer.spec.candidates[ctype].id_field
        idx = featurizer.candidates(ctype, pos[labels.CANDIDATE])[f"cand.{id_field}"].to_numpy()
        counts = np.bincount(idx, minlength=featurizer.spec.table_of(id_field).size)
        nz = np.nonzero(counts)[0]
        parts.append(pa.table({"task": [name] * len(nz), "index": nz.astype(np.int32), "count": counts[nz]}))
    return pa.concat_tables(parts)


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


def read_raw(path: Path) -> pa.Table:
    """A raw parquet file or directory of parts, in file order (deterministic)."""
    if not path.exists():
        raise FileNotFoundError(f"raw data {path} does not exist (check adapter.source / candidates.*.table)")
    files = raw_files(path)
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}")
    try:
        return pq.read_table(path) if path.is_file() else ds.dataset(files, format="parquet").to_table()
    except (pa.ArrowException, OSError) as e:
        bad = next((f for f in files if not _readable(f)), path)  # the dataset's error names no file
        raise ValueError(f"raw data {bad} is not a readable parquet file: {e}") from e


def raw_files(path: Path) -> list:
    """The parquet files of a raw file or directory of parts, in file order."""
    return [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))


def _readable(file: str) -> bool:
    try:
        pq.read_table(file)
        return True
    except (pa.ArrowException, OSError):
        return False


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


def _resolve(raw_dir: Path, source: str) -> Path:
    p = Path(source).expanduser()
    return p if p.is_absolute() else raw_dir / p


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=16_384)


def _write_shards(table: pa.Table, directory: Path, rows_per_file: int, transform) -> None:
    """``transform`` (featurize) each file's slice on its own, so memory grows with a file, not a split."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        _write(transform(table.slice(start, rows_per_file)), directory / f"part-{i:05d}.parquet")


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
