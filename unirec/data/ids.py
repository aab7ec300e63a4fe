"""Canonical text of ids, and content hashes of it, shared by label preparation, featurization and serving.

The hashes make every per-row choice of preparation (a request's id, a sampled negative, a kept request, a
user's partition) a function of the row's content, never of its position in a table: so the local and
the Spark engine, which see rows in different orders and partitions, prepare the same rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Up to 18 digits always fits int64; longer digit strings stay text rather than overflow.
_INTEGER = r"^-?\d{1,18}$"
_HASH_MULT = np.uint64(0x100000001B3)  # the FNV-1a 64-bit prime: an odd multiplier spreads every byte


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


def content_hash(text) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (0 for null), the same for the same text in any table.

    A polynomial hash, sum of (byte + 1) * M**position over a string, via one cumulative sum over the data
    buffer; then a splitmix finaliser so the low bits depend on every byte.

    >>> h = content_hash(pa.array(["a", "b", "a", None]))
    >>> bool(h[0] == h[2] and h[0] != h[1] and h[3] == 0)
    True
    """
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    text = pc.cast(text, pa.large_string())
    offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset : text.offset + len(text) + 1]
    data = text.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    position = np.arange(len(data)) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.r_[np.uint64(1), np.full(max(int(lengths.max(initial=0)) - 1, 0), _HASH_MULT)])
        summed = np.r_[np.uint64(0), np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[position])]
        h = _finalise((summed[starts + lengths] - summed[starts]) ^ lengths.astype(np.uint64))
    return np.where(np.asarray(pc.is_valid(text), dtype=bool), h, np.uint64(0))


def mix(*parts) -> np.ndarray:
    """A 64-bit hash of integer tuples, element-wise (scalars broadcast): a counter-based random number.

    >>> a, b = mix(1, np.arange(3)), mix(1, np.arange(3))
    >>> bool((a == b).all() and len(set(a.tolist())) == 3)
    True
    """
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for p in parts:
            h = _finalise(
                h ^ _finalise(np.asarray(p).astype(np.int64).view(np.uint64) + np.uint64(0x632BE5AB))
            )
    return np.asarray(h, dtype=np.uint64)


def uniform(*parts) -> np.ndarray:
    """Floats in [0, 1) from :func:`mix` of ``parts`` (53 random bits each)."""
    return (mix(*parts) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _finalise(h):
    """The splitmix64 finaliser: every output bit depends on every input bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))
