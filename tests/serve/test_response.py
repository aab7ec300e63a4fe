"""The rank answer's candidates are written from columns; the bytes must be those of the per-candidate dicts."""

import math

import numpy as np
import orjson
import pytest

from unirec.serve.app import candidates_json


@pytest.mark.parametrize(
    "ids, scores",
    [
        (["1", "2", "3"], [0.9, 0.5, 1e-7]),
        ([17, "x,y", 'q"uo\\te', "é😀", "a\\u0000"], [0.25, None, 1.0, 0.0, 3.5e-300]),
        (["only"], [None]),
        (["n"], [math.nan]),  # never produced (non-finite scores fall back), but still valid JSON
        ([], []),
        # Text ids are written as one array split at its '","' boundaries: ids that hold those characters,
        # escapes, empty ids, and numbers among texts or alone (the one-by-one path) must not move them.
        (['x","y', "z\\", '\\","', '","', "", "\n", '"'], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
        ([7], [0.5]),
        (["a", 7], [0.5, 0.25]),
        ([7, "a"], [0.5, 0.25]),
        (["a", "b", 3, "c"], [0.1, 0.2, 0.3, 0.4]),
        ([str(i) for i in range(1000)], [i / 1000 for i in range(1000)]),
    ],
)
def test_candidates_json_equals_orjson_of_the_dicts(ids, scores):
    expected = orjson.dumps([{"id": i, "type": "item", "score": s} for i, s in zip(ids, scores)])
    assert candidates_json(ids, "item", scores) == expected


@pytest.mark.parametrize(
    "scores",
    [
        [0.9, 0.5, 1e-7, 3.5e-300, 0.0, 1.0, 0.1 + 0.2, 2 / 3],
        [math.nan, 0.5, math.inf, 0.25, 1e300, -0.0, 5e-324, 0.123456789012345678],
    ],
)
@pytest.mark.parametrize("ids", [[str(i) for i in range(8)], [*range(4), *map(str, range(4))]])
def test_candidates_json_of_a_float64_array_equals_that_of_its_floats(ids, scores):
    """Scored answers pass the float64 array itself: the bytes are those of the Python floats' dicts, with
    every non-finite score written as null."""
    as_floats = [s if math.isfinite(s) else None for s in scores]
    expected = orjson.dumps([{"id": i, "type": "item", "score": s} for i, s in zip(ids, as_floats)])
    assert candidates_json(ids, "item", np.array(scores, dtype=np.float64)) == expected
