"""Preparation over real raw files: the cache key follows the raw files' content, and a broken or wholly
rejected log fails naming the file or the reason."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from unirec.config import compose
from unirec.data.prepare import build, dataset_key, prepare, read_raw
from unirec.data.synthetic import generate


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The toy data set's generated canvases, as a raw directory (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("raw") / "raw"
    generate(compose(["debug=toy"]).data.synthetic, out)
    return out


def _raw_cfg(raw_dir: Path, cache: Path):
    return compose(["debug=toy", "data.name=raw", f"data.raw_dir={raw_dir}", f"data.cache_dir={cache}"])


def _labeled_rows(features: Path, task: str) -> int:
    return sum(pq.read_table(p).num_rows for p in (features.parent / "labeled").glob(f"split=*/task={task}"))


def test_a_shrunk_raw_log_is_prepared_anew_not_served_stale(raw: Path, tmp_path: Path):
    raw_dir = Path(shutil.copytree(raw, tmp_path / "raw"))
    cfg = _raw_cfg(raw_dir, tmp_path / "cache")
    first = prepare(cfg.data, cfg.task, cfg.seed)
    assert prepare(cfg.data, cfg.task, cfg.seed) == first  # unchanged files: the cache is reused
    part = sorted((raw_dir / "home").glob("*.parquet"))[0]
    t = pq.read_table(part)
    pq.write_table(t.take(list(range(0, t.num_rows, 2))), part)  # every other row: the same time span
    second = prepare(cfg.data, cfg.task, cfg.seed)
    assert second != first
    assert _labeled_rows(second, "home") < _labeled_rows(first, "home")


def test_a_preparation_finished_by_another_process_meanwhile_is_kept_and_used(
    raw: Path, tmp_path: Path, monkeypatch
):
    """Two processes preparing one data set: the second to finish keeps the first's directory whole (a
    process may be training on it) and returns it."""
    import unirec.data.prepare as prep

    cfg = _raw_cfg(raw, tmp_path / "cache")
    final = tmp_path / "cache" / f"{cfg.data.name}-{dataset_key(cfg.data, cfg.task, cfg.seed)}"
    real = prep.build

    def build_while_another_finishes(raw_dir, out, *a, **kw):
        res = real(raw_dir, out, *a, **kw)
        shutil.copytree(out, final)  # the other process's complete result lands first
        (final / prep.SUCCESS).write_text("other")
        (final / "in-use").write_text("")
        return res

    monkeypatch.setattr(prep, "build", build_while_another_finishes)
    features = prepare(cfg.data, cfg.task, cfg.seed)
    assert features == final / "features" and (final / "in-use").exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # this one's copy removed


def test_the_movielens_key_follows_its_source_files(tmp_path: Path):
    src = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "ml100k" / "grouplens", tmp_path / "ml"))
    cfg = compose(["data=movielens", f"data.raw_dir={src}"])
    tasks = {k: v for k, v in cfg.task.items()}
    before = dataset_key(cfg.data, tasks, cfg.seed)
    assert dataset_key(cfg.data, tasks, cfg.seed) == before
    lines = (src / "u.data").read_text(encoding="latin-1").splitlines(keepends=True)
    (src / "u.data").write_text("".join(lines[:-1]), encoding="latin-1")
    assert dataset_key(cfg.data, tasks, cfg.seed) != before


def test_the_synthetic_key_needs_no_files_and_holds_no_time():
    cfg = compose(["debug=toy"])
    assert dataset_key(cfg.data, cfg.task, cfg.seed) == dataset_key(cfg.data, cfg.task, cfg.seed)


def test_a_corrupt_parquet_part_is_named(raw: Path, tmp_path: Path):
    raw_dir = Path(shutil.copytree(raw, tmp_path / "raw"))
    bad = sorted((raw_dir / "home").glob("*.parquet"))[-1]
    data = bytearray(bad.read_bytes())
    for i in range(200, len(data) // 2, 7):  # damage the pages, keep the footer: Arrow names no file
        data[i] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{bad.name} is not a readable parquet file"):
        read_raw(raw_dir / "home")
    cfg = _raw_cfg(raw_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match=rf"raw data {bad}"):
        build(raw_dir, tmp_path / "out", cfg.data, cfg.task, cfg.seed)


def test_a_task_whose_every_row_is_rejected_says_so_with_the_counts(raw: Path, tmp_path: Path):
    raw_dir = Path(shutil.copytree(raw, tmp_path / "raw"))
    cfg = _raw_cfg(raw_dir, tmp_path / "cache")
    # now = 1990-01-02: every home event (2023) lies beyond the horizon of one day
    with pytest.raises(
        ValueError, match=r"task home has no examples: every one .* rejected \{.*'bad_timestamp': \d+"
    ):
        build(raw_dir, tmp_path / "out", cfg.data, {"home": cfg.task["home"]}, cfg.seed, now=631_238_400)


def test_the_local_engine_prepares_the_same_rows_in_any_number_of_partitions(raw: Path, tmp_path: Path):
    """Out-of-core steps by hash partition: 2,000 rows a partition (several spill files per canvas, dozens of
    user buckets) prepares exactly what one partition does."""
    from tests.helpers.prepared import contents, differences

    roots = []
    for rows in (10_000_000, 2_000):
        cfg = _raw_cfg(raw, tmp_path / f"cache-{rows}")
        cfg.data.partition_rows = rows
        cfg.task = {k: cfg.task[k] for k in ("home", "genre")}  # a history, and sampled negatives
        roots.append(prepare(cfg.data, cfg.task, cfg.seed).parent)
    assert roots[0].name == roots[1].name  # partitioning is not part of the key
    assert len(list((roots[1] / "labeled" / "split=train" / "task=home").glob("*.parquet"))) > 5
    a, b = contents(roots[0]), contents(roots[1])
    assert len(a) > 15 and "history.parquet" in a
    assert differences(a, b) == []


def test_a_local_preparation_imports_neither_pyspark_nor_needs_java(tmp_path: Path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from unirec.config import compose\n"
        "from unirec.data.prepare import prepare\n"
        f"cfg = compose(['debug=toy', 'task=[home]', 'data.cache_dir={tmp_path / 'cache'}'])\n"
        "prepare(cfg.data, cfg.task, cfg.seed)\n"
        "assert not [m for m in sys.modules if m.startswith(('pyspark', 'py4j'))], 'pyspark imported'\n"
    )
    # Nothing on PATH, so no java either; the interpreter is named by its full path.
    env = {"PYTHONPATH": str(ROOT), "PATH": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
