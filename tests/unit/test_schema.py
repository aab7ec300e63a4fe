import json
import re
import shutil
from pathlib import Path

import pytest

from unirec.config import AdapterConfig, CandidateConfig, FieldConfig, TaskConfig
from unirec.schema import FeatureSpec, SchemaError, unified_context, validate_tasks


def _task(i, **fields):
    ctx = {k: FieldConfig(kind=v) for k, v in fields.items()}
    return TaskConfig(id=i, context=ctx, adapter=AdapterConfig(context={k: k for k in fields}))


CANDS = {
    "item": CandidateConfig(
        table="items.parquet", key="item_id", fields={"item": FieldConfig(column="item_id")}
    )
}


def test_union_of_fields_sorted_by_name():
    tasks = {
        "a": _task(0, user="categorical"),
        "b": _task(1, query="tokens", user="categorical"),
    }
    assert list(unified_context(tasks)) == ["query", "user"]


def test_conflicting_kinds_name_the_field():
    tasks = {"a": _task(0, user="categorical"), "b": _task(1, user="dense")}
    with pytest.raises(SchemaError, match=r"task\.b\.context\.user"):
        unified_context(tasks)


def test_duplicate_task_ids_rejected():
    tasks = {"a": _task(0, user="categorical"), "b": _task(0, query="tokens")}
    with pytest.raises(SchemaError, match=r"task\.b\.id=0 is already used by task a"):
        validate_tasks(tasks, CANDS)


def test_unknown_candidate_type_rejected():
    t = _task(0, user="categorical")
    t.candidate = "video"
    with pytest.raises(SchemaError, match=r"task\.a\.candidate='video'"):
        validate_tasks({"a": t}, CANDS)


def test_context_field_without_raw_column_rejected():
    t = _task(0, user="categorical")
    t.adapter.context = {}
    with pytest.raises(SchemaError, match="no raw column for context field 'user'"):
        validate_tasks({"a": t}, CANDS)


def test_feature_spec_round_trip(toy_features):
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    path = toy_features.parent / "spec-copy.json"
    spec.save(path)
    assert FeatureSpec.load(path) == spec
    assert set(spec.tasks) == {"home", "related", "search", "genre", "genre_rows"}
    assert list(spec.context) == sorted(spec.context)


@pytest.mark.parametrize("name", ["timestamp", "label", "candidate", "request_id", "weight", "task_type"])
def test_reserved_column_names_are_refused(name):
    with pytest.raises(SchemaError, match=rf"task\.a\.context\.{name}: .* rename the field"):
        unified_context({"a": _task(0, **{name: "categorical"})})


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.eval_every=0", "trainer.eval_every"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
        ("data.split.valid=0", "data.split.valid"),
        ("trainer.best_metric=home/ndcg@5", "task.home.metrics has no 'ndcg@5'"),
        ("trainer.best_metric=shop/auc", "'shop' is neither"),
    ],
)
def test_bad_run_settings_fail_at_start_naming_the_key(override, key):
    from unirec.config import compose
    from unirec.train import check

    with pytest.raises(ValueError, match=re.escape(key)):
        check(compose(["debug=toy", override]))


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"user": "user"}, r"task.a.impute.user: the task has 'user' itself"),
        ({"query": "title"}, r"task.a.impute.query='title': 'title' is not one of the task's context fields"),
        ({"query": "user.item_title"}, r"'item_title' is not a candidate field"),
        ({"age": "user"}, r"a dense field \(double\) cannot be filled from a categorical field \(string\)"),
    ],
)
def test_bad_imputation_rules_are_named(rule, message):
    a, b = _task(0, user="categorical"), _task(1, query="tokens", age="dense")
    a.impute = rule
    with pytest.raises(SchemaError, match=message):
        validate_tasks({"a": a, "b": b}, CANDS)


def test_a_rule_for_a_field_no_selected_task_has_is_inactive():
    from unirec.schema import active_rules

    a = _task(0, user="categorical")
    a.impute = {"query": "user"}
    validate_tasks({"a": a}, CANDS)  # query is not in the unified context: nothing to fill, no error
    assert active_rules(a, unified_context({"a": a})) == {}
    b = _task(1, query="tokens")
    assert active_rules(a, unified_context({"a": a, "b": b})) == {"query": "user"}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: next(iter(s["context"].values())).update(colour="red"),
            r"context\.\w+\.colour is not a key",
        ),
        (lambda s: next(iter(s["tables"].values())).pop("size"), r"tables\.\w+\.size is missing"),
        (lambda s: next(iter(s["tables"].values())).update(size="ten"), r"tables\.\w+\.size='ten' is not"),
        (lambda s: s["tasks"]["home"].update(fields="user"), r"tasks\.home\.fields='user' is not"),
        (lambda s: s.pop("tasks"), r"tasks is missing"),
        (lambda s: s.update(tables=[]), r"tables=\[\] is not"),
        (lambda s: s["context"].update(user=7), r"context\.user is int, expected an object"),
    ],
    ids=["extra", "missing", "type", "tuple", "group", "group-type", "record-type"],
)
def test_a_bad_spec_key_is_a_schema_error_naming_the_file_and_key(toy_features, tmp_path, change, message):
    spec = json.loads((toy_features / "feature_spec.json").read_text())
    change(spec)
    path = tmp_path / "feature_spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SchemaError, match=rf"{re.escape(str(path))}: .*{message}"):
        FeatureSpec.load(path)


def test_a_featurizer_refuses_a_vocabulary_outside_its_directory(toy_features, tmp_path):
    from unirec.data.features import Featurizer

    features = Path(shutil.copytree(toy_features, tmp_path / "features"))
    spec = json.loads((features / "feature_spec.json").read_text())
    spec["tables"]["user"]["vocab"] = str(features / "vocab" / "user.json")  # absolute, even if it exists
    (features / "feature_spec.json").write_text(json.dumps(spec))
    with pytest.raises(SchemaError, match=r"tables\.user\.vocab: .* must be a relative path"):
        Featurizer.load(features)
