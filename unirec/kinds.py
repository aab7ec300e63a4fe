"""Field kinds: the one place that knows how each kind of field is typed, fitted, encoded, embedded and requested.

A field (a context field such as ``user`` or ``query``, or a candidate field such as ``item_title``) has a
*kind*. Every other module asks the field's kind (:func:`kind_of`) instead of switching on its name, so a
new kind is one class registered here (or anywhere, with :func:`register`), and nothing else changes.

Each kind owns, for its fields:

- the raw Arrow type of the unified labeled column (:attr:`Kind.raw_type`) and the check of raw log values;
- what goes into its embedding table's vocabulary (:meth:`Kind.vocabulary_values`) and its fitted spec;
- how a raw Arrow column becomes a featurized column plus a presence bit (:meth:`Kind.encode`), and its
  sentinel column;
- its embedding and pooling module (:meth:`Kind.module`), which reads a shared table;
- its type in the request API (:meth:`Kind.request_type`) and how a request value is normalised.

Index convention of every table (categorical, token and sequence fields)::

    0  sentinel: missing (a missing field; a padding position of a bag or a sequence)
    1  out of vocabulary: present, but unseen in train (or rarer than min_count)
    2… vocabulary entries in order of decreasing train frequency, or hash buckets

Built-in kinds: ``categorical`` (one id), ``tokens`` (text split into a bag of words, mean-pooled),
``dense`` (a standardised float) and ``sequence`` (an ordered list of ids, oldest first, the ``max_len``
most recent kept; pooled by mean, by target-aware attention, or by a small causal transformer).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

if TYPE_CHECKING:  # the config and spec types, for annotations only (schema imports this module)
    from unirec.config import FieldConfig
    from unirec.schema import FieldSpec

SENTINEL = 0
OOV = 1
FIRST_ID = 2
# Tokens: lower-cased runs of letters or digits; everything else separates.
_TOKEN_SPLIT = r"[^\p{L}\p{N}]+"
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"

Lookup = Callable[[pa.Array], pa.Array]
"""Text values -> int32 table indices (null -> SENTINEL, unseen -> OOV), for one table."""


@dataclass(frozen=True)
class RequestLimits:
    """Length limits of request values, checked by the request model before any work is done."""

    text: int = 1000
    """Characters of a text value (token fields)."""
    id: int = 256
    """Characters of an id (categorical values, sequence entries)."""


@dataclass(frozen=True)
class EmbeddingOptions:
    """What a kind's embedding module may depend on, besides its field's spec."""

    dim: int
    """Embedding width D."""
    hidden: int = 64
    """Width H of the encoders (target-aware pooling projects the candidate vector from H)."""
    pooling: str = "mean"
    """Pooling of sequence fields: mean, attention or transformer."""
    layers: int = 1
    """Blocks of the transformer pooling."""
    heads: int = 2
    """Attention heads of the transformer pooling (must divide D)."""
    dropout: float = 0.0


class Kind:
    """Base of every field kind; a subclass sets :attr:`name` and overrides what differs."""

    name: ClassVar[str] = ""
    raw_type: ClassVar[pa.DataType] = pa.string()
    """Type of the field's column in the unified labeled data (and of a request value given to Arrow)."""
    has_table: ClassVar[bool] = True
    """Whether the field reads an embedding table (and so a vocabulary)."""
    ordered: ClassVar[bool] = False
    """Whether a value is a list of ids in time order, oldest first (what the transition baseline of
    :mod:`unirec.baselines` reads as the request's recent items)."""

    def bad_values(self, col: pa.Array) -> Optional[pa.Array]:
        """Boolean mask of raw log values that cannot be this kind (rejected as ``bad_type``); None: all fine."""
        return None

    def to_raw(self, col) -> pa.Array:
        """A raw log column as :attr:`raw_type`."""
        return pc.cast(_as_array(col), self.raw_type)

    def vocabulary_values(self, col) -> pa.Array:
        """The values of a train column that count towards the table's vocabulary (flat text)."""
        return pc.cast(_as_array(col), pa.string())

    def max_len(self, cfg: FieldConfig) -> int:
        """Width of the featurized column per row (1: a scalar column)."""
        return 1

    def stats(self, col) -> Tuple[float, float]:
        """(mean, std) fitted on train; kinds without statistics keep (0, 1)."""
        return 0.0, 1.0

    def encode(self, f: FieldSpec, col, lookup: Optional[Lookup]) -> Tuple[pa.Array, pa.Array]:
        """A raw column -> (featurized column, presence bits as uint8)."""
        values = lookup(_as_array(col))
        return values, pc.cast(pc.not_equal(values, SENTINEL), pa.uint8())

    def sentinels(self, f: FieldSpec, n: int) -> pa.Array:
        """A featurized column of n missing values."""
        if f.max_len > 1:
            return pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * f.max_len, np.int32)), f.max_len)
        return pa.array(np.zeros(n, np.int32))

    def module(self, f: FieldSpec, opts: EmbeddingOptions) -> nn.Module:
        """The field's embedding module: ``forward(x, table) -> [B, D]`` (``table`` the shared nn.Embedding).

        A module that also pools against each candidate (target-aware) adds ``memory(x, table)``,
        ``pool(memory)`` (its forward from the memory), ``attend_rows(memory, v)`` and
        ``attend_all(memory, v)`` (see :mod:`unirec.model.pooling`)."""
        from unirec.model import pooling  # lazily: unirec.model imports this module

        return pooling.Lookup()

    def request_type(self, f: FieldSpec, limits: RequestLimits) -> type:
        """The type of the field's value in a request (a pydantic annotation), with its length limits."""
        return Optional[id_type(limits.id)]

    def request_value(self, value):
        """A request's (already validated) value as the raw Arrow value; hashable (it keys a memo)."""
        return str(value)


KINDS: Dict[str, Kind] = {}
"""Kind name -> kind: the only list of kind names (config validation and docs read it)."""


def register(cls: Type[Kind]) -> Type[Kind]:
    """Register a kind under its ``name`` (a class decorator); registering a name again replaces it."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    KINDS[cls.name] = cls()
    return cls


def kind_of(field) -> Kind:
    """The kind of a field spec or config (or of a kind name)."""
    name = getattr(field, "kind", field)
    name = getattr(name, "value", name)
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown field kind {name!r}; known kinds: {sorted(KINDS)}") from None


@register
class Categorical(Kind):
    """One id per row, looked up in its table."""

    name = "categorical"


@register
class Tokens(Kind):
    """Text split into lower-cased word tokens: a bag of at most ``max_len`` ids, mean-pooled."""

    name = "tokens"

    def vocabulary_values(self, col) -> pa.Array:
        return pc.list_flatten(tokenize(col))

    def max_len(self, cfg: FieldConfig) -> int:
        return cfg.max_len

    def encode(self, f, col, lookup):
        col = _as_array(col)
        tokens = tokenize(col)
        ids = lookup(pc.list_flatten(tokens))
        values = pad_first(ids, pc.list_parent_indices(tokens).to_numpy(), len(col), f.max_len)
        first = values.flatten().to_numpy().reshape(len(col), f.max_len)[:, 0]
        return values, pa.array((first != SENTINEL).astype(np.uint8))

    def module(self, f, opts):
        from unirec.model import pooling

        return pooling.Bag()

    def request_type(self, f, limits):
        from pydantic import StrictStr, StringConstraints
        from typing_extensions import Annotated

        return Optional[Annotated[StrictStr, StringConstraints(max_length=limits.text)]]


@register
class Dense(Kind):
    """A float, standardised with the train mean and std and scaled by a learned vector."""

    name = "dense"
    raw_type = pa.float64()
    has_table = False

    def bad_values(self, col):
        col = _as_array(col)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            return None
        # A dense field logged as text: anything that does not parse as a number is a bad row.
        parses = pc.match_substring_regex(pc.cast(col, pa.string()), _NUMBER)
        return pc.and_(pc.is_valid(col), pc.invert(pc.fill_null(parses, False)))

    def vocabulary_values(self, col):
        raise TypeError("dense fields have no vocabulary")

    def stats(self, col):
        x = np.asarray(pc.cast(_as_array(col), pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        x = x[np.isfinite(x)]
        return (float(x.mean()), float(x.std()) or 1.0) if len(x) else (0.0, 1.0)

    def encode(self, f, col, lookup):
        x = pc.cast(_as_array(col), pa.float64())
        present = pc.fill_null(pc.is_finite(x), False)
        z = pc.divide(pc.subtract(x, f.mean), f.std)
        return pc.cast(pc.if_else(present, z, 0.0), pa.float32()), pc.cast(present, pa.uint8())

    def sentinels(self, f, n):
        return pa.array(np.zeros(n, np.float32))

    def module(self, f, opts):
        from unirec.model import pooling

        return pooling.Scale(opts.dim)

    def request_type(self, f, limits):
        from pydantic import Field
        from typing_extensions import Annotated

        return Optional[Annotated[float, Field(allow_inf_nan=False)]]

    def request_value(self, value):
        return float(value)


@register
class Sequence(Kind):
    """An ordered list of ids, oldest first: the ``max_len`` most recent kept, left-padded with the
    sentinel so the last position is always the most recent. Presence: at least one id.

    Pooling (``EmbeddingOptions.pooling``): ``mean`` (masked mean), ``transformer`` (causal self-attention,
    SASRec-style; the last position is the state) or ``attention`` (target-aware, DIN-style: each candidate
    attends over the history; the context slot holds the masked mean, the ranker adds the attended part).
    """

    name = "sequence"
    raw_type = pa.list_(pa.string())
    ordered = True

    def bad_values(self, col):
        t = _as_array(col).type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_null(t):
            return None
        return pa.array(np.ones(len(col), dtype=bool))

    def to_raw(self, col):
        col = _as_array(col)
        if pa.types.is_null(col.type):
            return pa.nulls(len(col), self.raw_type)
        return pc.cast(col, self.raw_type)

    def vocabulary_values(self, col):
        return pc.cast(pc.list_flatten(_as_array(col)), pa.string())

    def max_len(self, cfg):
        return cfg.max_len

    def encode(self, f, col, lookup):
        col = self.to_raw(col)
        flat = pc.list_flatten(col)
        keep = np.asarray(pc.is_valid(flat), dtype=bool)  # a null entry is no engagement: dropped
        parents = pc.list_parent_indices(col).to_numpy()[keep]
        ids = lookup(flat.filter(pa.array(keep)))
        lengths = np.bincount(parents, minlength=len(col)).astype(np.int64)
        values = pad_last(ids.to_numpy(zero_copy_only=False), lengths, f.max_len)
        return values, pa.array((lengths > 0).astype(np.uint8))

    def module(self, f, opts):
        from unirec.model import pooling

        if opts.pooling not in pooling.SEQUENCE_POOLINGS:
            choices = list(pooling.SEQUENCE_POOLINGS)
            raise ValueError(f"model.sequence_pooling={opts.pooling!r}: choose one of {choices}")
        return pooling.SEQUENCE_POOLINGS[opts.pooling](f.max_len, opts)

    def request_type(self, f, limits):
        from pydantic import Field
        from typing_extensions import Annotated

        # Ids beyond max_len are dropped (the oldest); a few times more are accepted, not unbounded.
        item = KINDS["categorical"].request_type(f, limits)
        return Optional[Annotated[List[item], Field(max_length=4 * f.max_len)]]

    def request_value(self, value):
        return tuple(str(v) for v in value if v is not None)


# ------------------------------------------------------------------------------------- Arrow helpers


def tokenize(text) -> pa.ListArray:
    """Lower-cased word tokens of each string (null stays null, separators drop out).

    >>> tokenize(pa.array(["Comedy|Drama", None])).to_pylist()
    [['comedy', 'drama'], None]
    """
    parts = pc.split_pattern_regex(pc.utf8_lower(_as_array(text)), _TOKEN_SPLIT)
    flat = pc.list_flatten(parts)
    parents = pc.list_parent_indices(parts).to_numpy()
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    counts = np.bincount(parents[keep], minlength=len(parts))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)), mask=pc.is_null(parts))


def vocabulary_lookup(vocab: Optional[pa.Array], hash_buckets: int) -> Lookup:
    """The index function of one table: its vocabulary, or ``hash_buckets`` stable hash buckets."""

    def lookup(values: pa.Array) -> pa.Array:
        txt = pc.cast(values, pa.string())
        if hash_buckets:
            return hash_index(txt, hash_buckets)
        idx = pc.index_in(txt, value_set=vocab)
        idx = pc.if_else(pc.is_null(idx), OOV, pc.add(idx, FIRST_ID))
        return pc.cast(pc.if_else(pc.is_null(txt), SENTINEL, idx), pa.int32())

    return lookup


def hash_index(txt: pa.Array, buckets: int) -> pa.Array:
    """Stable hash bucket per value; hashes each distinct value once (crc32 of its UTF-8)."""
    enc = pc.dictionary_encode(txt)
    uniq = enc.dictionary.to_pylist()
    table = np.array([FIRST_ID + zlib.crc32(v.encode()) % buckets for v in uniq], dtype=np.int32)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(txt), dtype=bool)
    out = np.full(len(txt), SENTINEL, dtype=np.int32)
    out[valid] = table[idx[valid].astype(np.int64)]
    return pa.array(out)


def pad_first(ids: pa.Array, parents: np.ndarray, n: int, max_len: int) -> pa.FixedSizeListArray:
    """Ragged ids (with their row index) -> fixed [n, max_len] bags: the first max_len, sentinel-padded."""
    ids_np = ids.to_numpy(zero_copy_only=False)
    first = np.searchsorted(parents, parents, side="left")
    pos = np.arange(len(parents)) - first
    keep = pos < max_len
    out = np.zeros((n, max_len), dtype=np.int32)
    out[parents[keep], pos[keep]] = ids_np[keep]
    return pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), max_len)


def pad_last(ids: np.ndarray, lengths: np.ndarray, max_len: int) -> pa.FixedSizeListArray:
    """Ragged ids (row lengths) -> fixed [n, max_len]: the last max_len of each row, right-aligned.

    >>> pad_last(np.array([5, 6, 7, 8]), np.array([3, 0, 1]), 2).to_pylist()
    [[6, 7], [0, 0], [0, 8]]
    """
    n = len(lengths)
    ends = np.cumsum(lengths)
    row = np.repeat(np.arange(n), lengths)
    from_end = np.repeat(ends, lengths) - 1 - np.arange(len(row))  # 0 for the most recent
    keep = from_end < max_len
    out = np.zeros((n, max_len), dtype=np.int32)
    out[row[keep], max_len - 1 - from_end[keep]] = ids[keep]
    return pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), max_len)


def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def id_type(max_len: int) -> type:
    """An id as a request may send it (a pydantic annotation): text of at most ``max_len`` characters, or an
    integer every JSON client reads exactly (I-JSON, RFC 7493: |n| < 2**53; larger ids go as strings)."""
    from pydantic import Field, StrictInt, StrictStr
    from typing_extensions import Annotated

    exact = 2**53 - 1
    return Union[
        Annotated[StrictStr, Field(max_length=max_len)], Annotated[StrictInt, Field(ge=-exact, le=exact)]
    ]
