import pyarrow as pa
import pyarrow.parquet as pq

from unirec.data.features import Featurizer, tokenize
from unirec.data.labels import SPLITS
from unirec.schema import FIRST_ID, OOV, SENTINEL


def test_tokenize_lowercases_and_drops_separators():
    assert tokenize(pa.array(["  Comedy|DRAMA  ", "", None, "año 1990s"])).to_pylist() == [
        ["comedy", "drama"],
        [],
        None,
        ["año", "1990s"],
    ]


def test_sentinel_oov_and_vocab_indices(toy_features):
    fz = Featurizer.load(toy_features)
    vocab_user = fz.vocabs["user"].to_pylist()
    t = pa.table({"user": [vocab_user[0], "never-seen", None], "query": ["comedy", None, "zzzqqq"]})
    out = fz.context(t)
    assert out["ctx.user"].to_pylist() == [FIRST_ID, OOV, SENTINEL]
    assert out["has.user"].to_pylist() == [1, 1, 0]
    q = out["ctx.query"].to_pylist()
    assert q[1] == [SENTINEL] * len(q[1]) and out["has.query"].to_pylist() == [1, 0, 1]
    assert q[2][0] == OOV
    # A field absent from the table entirely is missing for every row.
    assert out["has.source_item"].to_pylist() == [0, 0, 0]


def test_vocabularies_fitted_on_train_only(toy_features):
    prepared = toy_features.parent
    fz = Featurizer.load(toy_features)
    train_users = set()
    for task in ("home", "search", "genre", "genre_rows"):
        train_users |= set(
            pq.read_table(prepared / "labeled" / "split=train" / f"task={task}")["user"].to_pylist()
        )
    assert set(fz.vocabs["user"].to_pylist()) == train_users - {None}


def test_shards_cover_every_labeled_row(toy_features):
    prepared = toy_features.parent
    for split in SPLITS:
        for task in ("home", "related", "search", "genre"):
            labeled = pq.read_table(prepared / "labeled" / f"split={split}" / f"task={task}").num_rows
            shards = pq.read_table(toy_features / split / task)
            assert shards.num_rows == labeled
            assert set(shards["task_type"].to_pylist()) <= {0, 1, 2, 3}


def test_unknown_candidate_gets_oov_id_and_sentinel_content(toy_features):
    fz = Featurizer.load(toy_features)
    out = fz.candidates("item", pa.array(["1", "no-such-item"]))
    assert out["cand.item"].to_pylist()[1] == OOV
    assert out["cand.item_genres"].to_pylist()[1] == [SENTINEL] * 3
    assert out["cand.item_genres"].to_pylist()[0][0] >= FIRST_ID


def test_hash_buckets_replace_the_vocabulary(tmp_path):
    from unirec.config import compose
    from unirec.data.prepare import prepare

    cfg = compose(
        ["debug=toy", f"data.cache_dir={tmp_path}", "task=[home]", "task.home.context.user.hash_buckets=64"]
    )
    features = prepare(cfg.data, cfg.task, cfg.seed)
    fz = Featurizer.load(features)
    user = fz.spec.table_of("user")
    assert (user.size, user.hash_buckets, user.vocab) == (FIRST_ID + 64, 64, None)
    ids = fz.context(pa.table({"user": ["17", "17", "18", None]}))["ctx.user"].to_pylist()
    assert (
        ids[0] == ids[1] and FIRST_ID <= min(ids[:3]) and max(ids[:3]) < FIRST_ID + 64 and ids[3] == SENTINEL
    )


def test_min_count_sends_rare_values_to_oov(tmp_path):
    from unirec.config import compose
    from unirec.data.prepare import prepare

    cfg = compose(
        ["debug=toy", f"data.cache_dir={tmp_path}", "task=[home]", "task.home.context.user.min_count=1000000"]
    )
    fz = Featurizer.load(prepare(cfg.data, cfg.task, cfg.seed))
    assert fz.spec.table_of("user").size == FIRST_ID
    assert set(fz.context(pa.table({"user": ["1", "2"]}))["ctx.user"].to_pylist()) == {OOV}


def test_candidate_ids_match_in_any_spelling(toy_features):
    fz = Featurizer.load(toy_features)
    a = fz.candidates("item", pa.array(["7", "007", " 7 "]))
    assert len(set(map(tuple, [a["cand.item_title"].to_pylist()[i] for i in range(3)]))) == 1
    assert len(set(a["cand.item"].to_pylist())) == 1 and a["cand.item"].to_pylist()[0] != OOV


def test_imputation_fills_only_the_missing_fields_of_the_tasks_with_a_rule(toy_features):
    """related: query <- the source item's title; genre: query <- its genre; search keeps its own query
    and has no source item; an unknown source item leaves the query missing."""
    fz = Featurizer.load(toy_features)
    spec = fz.spec
    items = pq.read_table(toy_features / "candidates" / "item.parquet")
    title = dict(zip(map(str, items["item_id"].to_pylist()), items["title"].to_pylist()))
    rel, gen, sea = (spec.tasks[t].id for t in ("related", "genre", "search"))
    t = pa.table({
        "task_type": pa.array([rel, rel, gen, sea], pa.int32()),
        "source_item": ["3", "no-such-item", None, None],
        "genre": [None, None, "comedy", None],
        "query": [None, None, None, "drama"],
    })  # fmt: skip
    out = fz.impute(t)
    assert out["query"].to_pylist() == [title["3"], None, "comedy", "drama"]
    assert out["source_item"].to_pylist() == t["source_item"].to_pylist()
    feats = fz.context(t)
    assert feats["has.query"].to_pylist() == [1, 0, 1, 1]
    # A table of one task's requests (the service's case): the task comes from the caller.
    one = fz.context(pa.table({"source_item": ["3"]}), task_id=rel)
    assert one["ctx.query"].to_pylist() == feats["ctx.query"].to_pylist()[:1]
    assert fz.context(pa.table({"source_item": ["3"]}))["has.query"].to_pylist() == [0]  # no task, no rule


def test_imputation_switched_off_leaves_fields_missing(tmp_path):
    from unirec.config import compose
    from unirec.data.prepare import prepare

    cfg = compose(["debug=toy", f"data.cache_dir={tmp_path}", "data.impute=false", "task=[related,search]"])
    features = prepare(cfg.data, cfg.task, cfg.seed)
    fz = Featurizer.load(features)
    assert fz.spec.tasks["related"].impute == {} and not fz.impute
    shard = pq.read_table(sorted((features / "train" / "related").glob("*.parquet"))[0])
    assert set(shard["has.query"].to_pylist()) == {0}
