"""The Spark engine prepares what the local engine prepares: the same spec and vocabularies, the same rows
per split and task (in any files and order), the same rejects; and training reads its shards.

One real local Spark session (``local[2]``, 4 shuffle partitions) serves every test of the module; the
module is skipped where pyspark or Java is missing (``.ci/run`` installs both)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.prepared import contents, differences
from unirec.config import compose
from unirec.data.prepare import prepare

pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip(
        "the Spark engine needs Java (apt-get install openjdk-17-jre-headless)", allow_module_level=True
    )

SPARK = ["data.engine=spark", "data.spark.master='local[2]'", "data.spark.shuffle_partitions=4"]
ML_TASKS = "task=[movielens/home,movielens/related,movielens/search,movielens/genre]"


@pytest.fixture(scope="module")
def spark():
    from unirec.config import SparkConfig
    from unirec.data.engine_spark import session

    s = session(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="1g"))
    yield s
    s.stop()


def _both(overrides, tmp_path: Path):
    """The prepared directories of the local and the Spark engine, from the same config."""
    roots = []
    for engine, extra in (("local", []), ("spark", SPARK)):
        cfg = compose([*overrides, f"data.cache_dir={tmp_path / engine}", *extra])
        roots.append(prepare(cfg.data, cfg.task, cfg.seed).parent)
    return roots


@pytest.mark.slow
def test_toy_synthetic_canvases_prepare_alike(spark, tmp_path):
    local, remote = _both(["debug=toy"], tmp_path)
    a, b = contents(local), contents(remote)
    assert len(a) > 40 and sum(a["rejects.json"]["home"].values()) > 0
    assert differences(a, b) == []


@pytest.mark.slow
def test_movielens_fixture_canvases_prepare_alike(spark, tmp_path):
    """The MovieLens pipeline test's source (tests/fixtures/ml100k has too few ratings for a time split of
    four canvases): its own split column, the history from the derivation's interactions with an order."""
    from tests.unit.test_movielens import write_grouplens

    src = write_grouplens(tmp_path / "ml-100k", n_users=60, n_items=80)
    local, remote = _both(["data=movielens", f"data.raw_dir={src}", ML_TASKS], tmp_path)
    a, b = contents(local), contents(remote)
    assert "history.parquet" in a
    assert differences(a, b) == []


def test_one_small_task_on_spark_matches_local_and_trains(spark, tmp_path):
    """The fast end-to-end check of the default run: one canvas, one Spark preparation, then training."""
    from tests.conftest import run_train

    small = ["debug=toy", "task=[home]", "data.synthetic.requests_per_task=200"]
    local, remote = _both(small, tmp_path)
    assert local.name == remote.name  # the engine is not part of the data set's key
    assert differences(contents(local), contents(remote)) == []
    assert not list(remote.rglob("_SUCCESS"))[1:] and not list(remote.rglob("*.crc"))
    proc = run_train(
        [
            *small,
            "trainer.max_steps=3",
            f"data.cache_dir={tmp_path / 'spark'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing prepared data" in proc.stdout + proc.stderr
