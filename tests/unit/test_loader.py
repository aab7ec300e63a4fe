import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unirec.config import LoaderConfig, MixStrategy
from unirec.data.loader import MixedLoader, TaskStream, eval_batches, mix_probabilities, shard_files
from unirec.schema import FeatureSpec


def _loader(features, seed=0, **kw):
    spec = FeatureSpec.load(features / "feature_spec.json")
    cfg = LoaderConfig(batch_size=256, shuffle_buffer=1024, prefetch=0, **kw)
    return MixedLoader(
        features, spec, cfg, {"home": 1, "related": 1, "search": 2, "genre": 4, "genre_rows": 1}, seed
    ), spec


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


def test_state_round_trip_resumes_the_same_rows(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    cfg = LoaderConfig(batch_size=200, shuffle_buffer=1000, prefetch=0)
    ref = MixedLoader(toy_features, spec, cfg, {}, 11)
    for _ in range(7):  # past several buffer refills
        ref.next_arrays()
    state = json.loads(json.dumps(ref.state()))  # it is plain data
    fresh = MixedLoader(toy_features, spec, cfg, {}, 11)
    fresh.load_state(state)
    for _ in range(20):
        a, b = ref.next_arrays(), fresh.next_arrays()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_prefetched_batches_carry_the_state_of_the_batch_consumed(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    cfg = LoaderConfig(batch_size=128, shuffle_buffer=512, prefetch=3)
    it = MixedLoader(toy_features, spec, cfg, {}, 2).batches()
    for _ in range(4):
        _, state = next(it)
    nxt, _ = next(it)
    resumed = MixedLoader(
        toy_features, spec, LoaderConfig(batch_size=128, shuffle_buffer=512, prefetch=0), {}, 2
    )
    resumed.load_state(state)
    assert np.array_equal(resumed.next_batch().request_id.numpy(), nxt.request_id.numpy())


def test_ranks_partition_every_epoch_exactly(toy_features):
    files = shard_files(toy_features, "train", "search")
    table = pq.read_table(files)
    want = Counter(zip(table["request_id"].to_pylist(), table["cand.item"].to_pylist()))
    got = Counter()
    for rank in range(3):
        stream = TaskStream(files, 10**9, np.random.default_rng(0), rank=rank, world=3)
        n = sum(stream._unit_rows(u) for u in range(len(stream.units)))
        rows = stream.take(n)
        assert stream.epoch == 1
        got.update(zip(rows["request_id"].tolist(), rows["cand.item"].tolist()))
    assert got == want


def test_resident_streams_cover_each_epoch_and_resume(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    cfg = LoaderConfig(batch_size=300, resident=True)
    ld = MixedLoader(toy_features, spec, cfg, {}, 5)
    stream = ld.streams["home"]
    rows = stream.take(stream.n)
    table = pq.read_table(shard_files(toy_features, "train", "home"))
    got = Counter(zip(rows["request_id"].tolist(), rows["cand.item"].tolist()))
    assert got == Counter(zip(table["request_id"].to_pylist(), table["cand.item"].to_pylist()))
    assert rows["cand.item"].dtype == torch.int64  # widened once at load time

    for _ in range(3):
        ld.next_batch()
    state = json.loads(json.dumps(ld.state()))
    again = MixedLoader(toy_features, spec, cfg, {}, 5)
    again.load_state(state)
    for _ in range(5):
        a, b = ld.next_batch(), again.next_batch()
        assert torch.equal(a.request_id, b.request_id) and torch.equal(a.context["user"], b.context["user"])


def test_resident_batches_equal_their_rows(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    batch = MixedLoader(toy_features, spec, LoaderConfig(batch_size=64, resident=True), {}, 1).next_batch()
    assert batch.present.dtype == torch.float32 and batch.present.shape == (64, len(spec.context))
    assert batch.context["query"].shape == (64, spec.context["query"].max_len)


def test_resident_resume_before_a_task_was_ever_drawn(toy_features):
    from unirec.data.resident import ResidentStream

    files = shard_files(toy_features, "train", "genre")
    ref = ResidentStream(files, 9, torch.device("cpu"))
    saved = json.loads(json.dumps(ref.state()))  # nothing drawn yet
    again = ResidentStream(files, 9, torch.device("cpu"))
    again.load_state(saved)
    assert torch.equal(ref.take(50)["request_id"], again.take(50)["request_id"])
