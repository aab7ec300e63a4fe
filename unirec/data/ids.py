"""Canonical text of candidate ids, shared by label preparation, featurization and serving."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# Up to 18 digits always fits int64; longer digit strings stay text rather than overflow.
_INTEGER = r"^-?\d{1,18}$"


def normalise_ids(ids) -> pa.Array:
    """Ids as canonical text: trimmed, and integers without leading zeros ("042", " 42" and 42 are one id).

    >>> normalise_ids(pa.array(["042", " 42 ", "x9", None, "0000000000000000000001"])).to_pylist()
    ['42', '42', 'x9', None, '0000000000000000000001']
    >>> normalise_ids(pa.array([7, None])).to_pylist()
    ['7', None]
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    txt = pc.utf8_trim_whitespace(pc.cast(ids, pa.string()))
    numeric = pc.fill_null(pc.match_substring_regex(txt, _INTEGER), False)
    as_int = pc.cast(pc.if_else(numeric, txt, pa.scalar("0")), pa.int64())
    return pc.if_else(numeric, pc.cast(as_int, pa.string()), txt)
