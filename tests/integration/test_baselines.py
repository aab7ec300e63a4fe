"""The baselines of the full-ranking protocol on a MovieLens-layout data set with a planted structure."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.unit.test_movielens import write_grouplens
from unirec.baselines import BPRConfig, baseline_digest, fit_bpr
from unirec.config import compose
from unirec.data.features import Featurizer
from unirec.data.prepare import popularity_counts, prepare
from unirec.evaluate import _baselines
from unirec.ranking import full_ranking, popularity_matrix_scorer

ML_TASKS = "task=[" + ",".join(f"movielens/{t}" for t in ("home", "related", "search", "genre")) + "]"


def _two_tastes(d, n_users=80, n_items=60, per_user=18, seed=0):
    """Odd users rate only items 1..30, even users only 31..60: a factorisation finds it, popularity cannot."""
    write_grouplens(d, n_users=n_users, n_items=n_items)  # the item and user files
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        pool = np.arange(1, 31) if u % 2 else np.arange(31, 61)
        items = rng.choice(pool, size=per_user, replace=False)
        ts = 880_000_000 + np.sort(rng.integers(0, 5_000_000, per_user))
        rows += [f"{u}\t{i}\t4\t{t}" for i, t in zip(items, ts)]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    return d


def _prepare(src, cache, seed=0):
    cfg = compose(
        ["data=movielens", f"data.raw_dir={src}", ML_TASKS, f"data.cache_dir={cache}", f"seed={seed}"]
    )
    features = prepare(cfg.data, cfg.task, cfg.seed)
    featurizer = Featurizer.load(features)
    return features, featurizer, {c: featurizer.catalogue_ids(c) for c in featurizer.spec.candidates}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = _two_tastes(tmp_path_factory.mktemp("ml") / "ml-100k")
    return _prepare(src, tmp_path_factory.mktemp("cache"))


def test_pooled_popularity_sums_every_task_train_counts(prepared):
    features, featurizer, cats = prepared
    spec = featurizer.spec
    scorer = popularity_matrix_scorer(features, featurizer, cats, pooled=True)
    counts = popularity_counts(pq.read_table(features / "popularity.parquet"), spec)
    idx = featurizer.candidates("item", cats["item"])["cand.item"].to_numpy()
    expected = sum(counts[t] for t in spec.tasks)[idx]
    got = scorer("home", pq.read_table(features.parent / "labeled" / "split=test" / "task=home").slice(0, 3))
    assert got.shape == (3, len(cats["item"]))
    assert np.abs(got.numpy() - expected[None, :]).max() < 1e-3  # the seeded jitter only
    assert expected.sum() == sum(counts[t].sum() for t in spec.tasks) > counts["home"].sum()


def test_bpr_mf_finds_the_planted_tastes_and_ranks_only_tasks_with_a_user(prepared):
    features, featurizer, cats = prepared
    bpr = fit_bpr(
        features.parent, featurizer, cats, BPRConfig(dims=(8,), l2=(1e-4,), lr=0.02, batch_size=128)
    )
    assert bpr.tasks == {"home", "search", "genre"}  # related requests carry no user
    assert bpr.chosen["dim"] == 8 and bpr.chosen["epochs"] >= 2
    pop = popularity_matrix_scorer(features, featurizer, cats, pooled=True)
    res = full_ranking({"bpr": bpr, "pop": pop}, features.parent, featurizer.spec, "test", cats)
    assert set(res["bpr"]) == {"home", "search", "genre"} and set(res["pop"]) == set(featurizer.spec.tasks)
    # Half the catalogue is out of a user's taste: a factorisation that found it ranks far above popularity.
    assert res["bpr"]["home"]["ndcg@10"] > 1.5 * res["pop"]["home"]["ndcg@10"], res


def test_seeds_whose_pooled_inputs_agree_share_the_baseline_figures(tmp_path):
    """Another seed draws other canvases from the same ratings: the same digest, and figures from the cache
    equal to the ones computed afresh. Other ratings: another digest."""
    src = _two_tastes(tmp_path / "a" / "ml-100k")
    a, b = _prepare(src, tmp_path / "cache", 0), _prepare(src, tmp_path / "cache", 1)
    assert a[0] != b[0]  # two prepared data sets
    home = [
        pq.read_table(f)["request_id"].to_pylist()
        for f in (a[0].parent / "labeled" / "split=train" / "task=home").glob("*.parquet")
    ]
    home_b = [
        pq.read_table(f)["request_id"].to_pylist()
        for f in (b[0].parent / "labeled" / "split=train" / "task=home").glob("*.parquet")
    ]
    assert sorted(sum(home, [])) != sorted(sum(home_b, []))  # whose canvases differ
    assert baseline_digest(*a, "test") == baseline_digest(*b, "test") != baseline_digest(*a, "valid")
    other = _prepare(_two_tastes(tmp_path / "c" / "ml-100k", seed=1), tmp_path / "cache", 0)
    assert baseline_digest(*other, "test") != baseline_digest(*a, "test")
    cache = tmp_path / "baselines"
    out_a, out_b, fresh = {}, {}, {}
    first = _baselines(*a, "test", 10, 0, cache, out_a)
    reused = _baselines(*b, "test", 10, 0, cache, out_b)
    assert "baselines_from" in out_b and "baselines_from" not in out_a and len(list(cache.iterdir())) == 1
    assert reused == first and out_b["baselines"] == out_a["baselines"]
    assert _baselines(*b, "test", 10, 0, None, fresh) == first  # what the cache stands in for


def _chains(d, n_users=60, n_items=40, per_user=12, seed=0):
    """Every user rates a run of consecutive items of one cycle (k, k+1, ...), in time order: what comes next
    is the item after the last one, which transitions find and popularity cannot."""
    write_grouplens(d, n_users=n_users, n_items=n_items)
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        start = int(rng.integers(0, n_items))
        items = [(start + k) % n_items + 1 for k in range(per_user)]
        rows += [f"{u}\t{i}\t4\t{880_000_000 + 1000 * u + k}" for k, i in enumerate(items)]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    return d


def test_transitions_find_what_comes_next_and_rank_only_tasks_with_a_history(tmp_path):
    from unirec.baselines import TransitionsConfig, fit_transitions

    features, featurizer, cats = _prepare(_chains(tmp_path / "ml-100k"), tmp_path / "cache")
    tr = fit_transitions(features.parent, featurizer, cats, TransitionsConfig(windows=(1, 3), recent=(1, 3)))
    assert tr.tasks == {"home", "search", "genre"}  # related requests carry no history
    assert (
        tr.chosen["window"] in (1, 3) and tr.chosen["recent"] in (1, 3) and tr.chosen["valid_ndcg@10"] > 0.9
    )
    pop = popularity_matrix_scorer(features, featurizer, cats, pooled=True)
    res = full_ranking({"tr": tr, "pop": pop}, features.parent, featurizer.spec, "test", cats)
    assert set(res["tr"]) == {"home", "search", "genre"}
    # The next item of the chain is first for (nearly) every user; popularity sees a flat catalogue.
    assert res["tr"]["home"]["recall@10"] > 0.95 and res["tr"]["home"]["ndcg@10"] > 0.9, res["tr"]
    assert res["pop"]["home"]["ndcg@10"] < 0.5
