from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from unirec.config import LoaderConfig, MixStrategy
from unirec.data.loader import MixedLoader, TaskStream, eval_batches, mix_probabilities, shard_files
from unirec.schema import FeatureSpec


def _loader(features, seed=0, **kw):
    spec = FeatureSpec.load(features / "feature_spec.json")
    cfg = LoaderConfig(batch_size=256, shuffle_buffer=1024, prefetch=0, **kw)
    return MixedLoader(features, spec, cfg, {"home": 1, "related": 1, "search": 2, "genre": 4}, seed), spec


def test_same_seed_same_batches_different_seed_differs(toy_features):
    a, _ = _loader(toy_features, 3)
    b, _ = _loader(toy_features, 3)
    c, _ = _loader(toy_features, 4)
    xa, xb, xc = (np.concatenate([ld.next_arrays()["request_id"] for _ in range(5)]) for ld in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)


@pytest.mark.parametrize("mix", list(MixStrategy))
def test_batches_follow_the_mix(toy_features, mix):
    ld, spec = _loader(toy_features, mix=mix, alpha=0.5)
    names = spec.task_names_by_id()
    counts = Counter()
    for _ in range(40):
        counts.update(names[int(t)] for t in ld.next_arrays()["task_type"])
    total = sum(counts.values())
    for task, p in ld.probs.items():
        assert abs(counts[task] / total - p) < 0.03, (task, counts[task] / total, p)


def test_mix_probabilities_temperature_and_weights():
    rows = {"a": 900, "b": 100}
    t = mix_probabilities(rows, LoaderConfig(mix=MixStrategy.temperature, alpha=0.5), {})
    assert t["a"] == pytest.approx(30 / 40)
    w = mix_probabilities(rows, LoaderConfig(mix=MixStrategy.weights), {"a": 1, "b": 3})
    assert w == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="loader.mix=weights"):
        mix_probabilities(rows, LoaderConfig(mix=MixStrategy.weights), {"a": 0, "b": 0})


def test_stream_sees_every_row_once_per_epoch(toy_features):
    files = shard_files(toy_features, "train", "home")
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    stream = TaskStream(files, buffer_rows=10**9, rng=np.random.default_rng(0))
    rows = stream.take(n)
    all_rows = pq.read_table(files)
    # request ids repeat within a slate: compare (request, candidate) multisets
    got = Counter(zip(rows["request_id"].tolist(), rows["cand.item"].tolist()))
    want = Counter(zip(all_rows["request_id"].to_pylist(), all_rows["cand.item"].to_pylist()))
    assert got == want and stream.epoch == 1


def test_eval_batches_in_file_order(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    ids = np.concatenate(
        [b.request_id.numpy() for b in eval_batches(toy_features, spec, "valid", "search", 100)]
    )
    assert np.array_equal(
        ids, pq.read_table(shard_files(toy_features, "valid", "search"))["request_id"].to_numpy()
    )


def test_prefetch_thread_yields_same_batches(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    plain, _ = _loader(toy_features, 7)
    cfg = LoaderConfig(batch_size=256, shuffle_buffer=1024, prefetch=2)
    threaded = MixedLoader(toy_features, spec, cfg, {"home": 1, "related": 1, "search": 2, "genre": 4}, 7)
    it = iter(threaded)
    for _ in range(3):
        assert np.array_equal(next(it).request_id.numpy(), plain.next_arrays()["request_id"])
