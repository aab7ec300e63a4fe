"""Property-based tests (hypothesis): the Featurizer and the Imputer on any values, the request model on any
JSON. Each property runs a bounded number of examples (about a second each)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from unirec.data.features import Featurizer
from unirec.kinds import SENTINEL, kind_of
from unirec.serve.api import rank_request_model

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Valid Unicode only: a lone surrogate cannot be UTF-8 (the request model refuses it before featurization).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@pytest.fixture(scope="module")
def featurizer(toy_features) -> Featurizer:
    return Featurizer.load(toy_features)


def _value(kind: str, ids):
    """A raw value of one kind: any text, an id of the catalogue, a number, or missing."""
    if kind == "dense":
        return st.none() | st.floats(allow_nan=True, allow_infinity=True)
    if kind == "sequence":
        return st.none() | st.lists(st.none() | TEXT | ids, max_size=12)
    return st.none() | TEXT | ids | st.integers(-(2**63), 2**63 - 1).map(str)


@st.composite
def raw_rows(draw, fz: Featurizer) -> pa.Table:
    ids = st.sampled_from(fz.catalogue_ids("item").slice(0, 50).to_pylist())
    n = draw(st.integers(1, 6))
    task_ids = sorted(t.id for t in fz.spec.tasks.values())
    cols = {
        "task_type": pa.array(draw(st.lists(st.sampled_from(task_ids), min_size=n, max_size=n)), pa.int32())
    }
    for name, f in fz.spec.context.items():
        if draw(st.booleans()):  # an absent column is as valid as a present one
            values = draw(st.lists(_value(f.kind, ids), min_size=n, max_size=n))
            cols[name] = pa.array(values, kind_of(f).raw_type)
    return pa.table(cols)


@given(data=st.data())
@SETTINGS
def test_any_values_featurize_and_presence_bits_match_the_sentinels(featurizer: Featurizer, data):
    table = data.draw(raw_rows(featurizer))
    out = featurizer.context(table)
    for name, f in featurizer.spec.context.items():
        has = out[f"has.{name}"].to_numpy(zero_copy_only=False)
        assert len(has) == table.num_rows and set(np.unique(has)) <= {0, 1}
        values = np.asarray(out[f"ctx.{name}"].to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)
        if f.kind == "dense":
            assert np.isfinite(values).all()
            assert (values[has == 0] == 0).all()  # missing (or non-finite) stands at 0
        elif f.kind == "tokens":
            assert ((values[:, 0] != SENTINEL) == (has == 1)).all()  # bags fill from the first slot
        else:  # an id, or a sequence: present iff any slot is not the sentinel
            assert ((values != SENTINEL).any(axis=1) == (has == 1)).all()
            assert (values >= 0).all() and (values < featurizer.spec.tables[f.table].size).all()
        targets = {t for task in featurizer.spec.tasks.values() for t in task.impute}
        if name not in targets:  # nothing fills it: a missing value is a 0 bit
            col = table[name] if name in table.column_names else pa.nulls(table.num_rows)
            assert (has[~col.is_valid().to_numpy(zero_copy_only=False)] == 0).all()


@given(data=st.data())
@SETTINGS
def test_imputing_twice_is_imputing_once(featurizer: Featurizer, data):
    assert featurizer.impute  # the toy data set has rules (query from the source item's title, from genre)
    table = data.draw(raw_rows(featurizer))
    once = featurizer.impute(table)
    assert featurizer.impute(once).equals(once)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def request_model(toy_features):
    from unirec.schema import FeatureSpec

    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    return spec, rank_request_model(spec, ["home", "search"], 50)


@st.composite
def request_like(draw, spec) -> dict:
    """Objects shaped like a request (its keys, any values), so validation goes past the first key."""
    fields = st.sampled_from(sorted(spec.context) + ["colour"])
    body = {
        "task": draw(st.sampled_from(sorted(spec.tasks)) | JSON),
        "environment": draw(st.sampled_from(["home", "search", "x"]) | JSON),
        "context": draw(st.dictionaries(fields, JSON | TEXT, max_size=4) | JSON),
        "candidates": draw(
            st.fixed_dictionaries({"ids": st.lists(TEXT | st.integers() | JSON, max_size=5)})
            | st.fixed_dictionaries({"source": JSON, "limit": JSON})
            | JSON
        ),
    }
    keys = draw(st.sets(st.sampled_from(sorted(body)), min_size=1))
    return {k: body[k] for k in keys}


@given(data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_validates_or_is_a_validation_error(request_model, data):
    spec, model = request_model
    body = data.draw(JSON | request_like(spec))
    for parse in (model.model_validate, lambda b: model.model_validate_json(json.dumps(b))):
        try:
            parse(body)
        except ValidationError:
            pass
