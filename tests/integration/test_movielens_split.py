"""The leave-one-out split of the real MovieLens-100K is the standard one, checked by fingerprint.

The data is the RecBole layout that ``scripts/fetch_movielens.py --source recbole`` writes (``.ci/run``
fetches it); point ``UNIREC_ML100K`` at another copy. The fingerprints are the sha256 of each split's
(user, item) pairs written as ``"{user}\\t{item}\\n"`` lines in (user, item) order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from unirec.data import movielens as ml

ROOT = Path(__file__).resolve().parents[2]
RAW = Path(os.environ.get("UNIREC_ML100K", ROOT / "data" / "ml-100k"))
FINGERPRINTS = {
    "test": "d45c5d7f8e2a6d6eea803e9ec75d9e3813fffb04ffe2dc9295ee8b7d10af488a",
    "valid": "c52173fad1f00005e0b39d18acbf6245167b4885d9ffba43c1b90740a5f2aca5",
}


def fingerprint(users, items) -> str:
    pairs = sorted(zip(users.tolist(), items.tolist()))
    return hashlib.sha256("".join(f"{u}\t{i}\n" for u, i in pairs).encode()).hexdigest()


@pytest.mark.skipif(
    not (RAW / "ml-100k.inter").is_file(),
    reason=f"no RecBole-layout MovieLens-100K at {RAW}: python scripts/fetch_movielens.py {RAW} --source recbole",
)
def test_split_matches_the_standard_leave_one_out_fingerprints():
    ev = ml.split_events(ml.load(RAW).ratings)
    assert len(ev["user"]) == 100_000
    for split, expected in FINGERPRINTS.items():
        chosen = ev["split"] == split
        assert chosen.sum() == 943, split
        assert fingerprint(ev["user"][chosen], ev["item"][chosen]) == expected, split
