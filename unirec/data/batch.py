"""The Arrow-to-tensor contract shared by training, evaluation and serving: column prefixes, dtypes, ``Batch``.

Featurized columns carry their role in a prefix (see :mod:`unirec.data.features`)::

    ctx.<field>   context field value      has.<field>   its presence bit
    cand.<field>  candidate field value    task_type, label, weight, request_id

On the way to tensors, fixed-size list columns (token bags, sequences) become [n, L] matrices, and every
integer column narrower than int64 (ids are stored as int32, presence bits as uint8) is widened to int64
by :func:`widen`, the one place that does it; the presence mask becomes float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from unirec.schema import FeatureSpec

CONTEXT, PRESENT, CANDIDATE = "ctx.", "has.", "cand."
Arrays = Dict[str, np.ndarray]

# Arrow hands out read-only numpy views; batches are never written in place, so sharing them is safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def widen(t: torch.Tensor) -> torch.Tensor:
    """Narrow integer tensors (int32 ids, uint8 bits) as int64, the index type of embeddings; others as they are."""
    return t.long() if t.dtype in (torch.int32, torch.int16, torch.uint8, torch.int8) else t


@dataclass
class Batch:
    """One batch of examples as tensors.

    Shapes: B rows, F context fields; token and sequence fields are [B, L].
        context: field -> [B] int64 | [B, L] int64 | [B] float32
        present: [B, F] float32 presence mask in ``spec.context`` order
        candidate: field -> as context
        task_type, label, weight, request_id: [B]
    """

    context: Dict[str, torch.Tensor]
    present: torch.Tensor
    candidate: Dict[str, torch.Tensor]
    task_type: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    request_id: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """On ``device`` with the model's dtypes (see :func:`widen`; the presence mask as float32)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return widen(t.to(device, non_blocking=non_blocking))

        return Batch(
            {k: mv(v) for k, v in self.context.items()},
            self.present.to(device, non_blocking=non_blocking).float(),
            {k: mv(v) for k, v in self.candidate.items()},
            mv(self.task_type),
            mv(self.label),
            mv(self.weight),
            mv(self.request_id),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, so a CUDA copy with ``non_blocking=True`` overlaps compute."""
        return Batch(
            {k: v.pin_memory() for k, v in self.context.items()},
            self.present.pin_memory(),
            {k: v.pin_memory() for k, v in self.candidate.items()},
            *(t.pin_memory() for t in (self.task_type, self.label, self.weight, self.request_id)),
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, rows: torch.Tensor) -> Batch:
        """The rows ``rows`` (indices or a bool mask [B]) of every tensor."""
        return Batch(
            {k: v[rows] for k, v in self.context.items()},
            self.present[rows],
            {k: v[rows] for k, v in self.candidate.items()},
            *(t[rows] for t in (self.task_type, self.label, self.weight, self.request_id)),
        )

    @staticmethod
    def cat(parts: Sequence[Batch]) -> Batch:
        """Batches with the same fields, one after another."""
        first = parts[0]
        return Batch(
            {k: torch.cat([p.context[k] for p in parts]) for k in first.context},
            torch.cat([p.present for p in parts]),
            {k: torch.cat([p.candidate[k] for p in parts]) for k in first.candidate},
            *(
                torch.cat([getattr(p, a) for p in parts])
                for a in ("task_type", "label", "weight", "request_id")
            ),
        )


def to_batch(cols: Arrays, spec: FeatureSpec) -> Batch:
    """Numpy columns (as read from shards) or tensors -> a :class:`Batch`; zero-copy where dtypes allow."""
    t = torch.as_tensor
    present = torch.stack([t(cols[f"{PRESENT}{f}"]) for f in spec.context], dim=1)
    return Batch(
        context={f: t(cols[f"{CONTEXT}{f}"]) for f in spec.context},
        present=t(present),
        candidate={f: t(cols[f"{CANDIDATE}{f}"]) for f in spec.candidate_fields if f"{CANDIDATE}{f}" in cols},
        task_type=t(cols["task_type"]),
        label=t(cols["label"]),
        weight=t(cols["weight"]),
        request_id=t(cols["request_id"]),
    )


def column_array(arr) -> np.ndarray:
    """An Arrow column as numpy: fixed-size lists become [n, L] matrices without copying their values."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr.type, pa.FixedSizeListType):
        return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


def table_to_arrays(table: pa.Table) -> Arrays:
    """Arrow columns -> numpy (see :func:`column_array`)."""
    return {name: column_array(table[name]) for name in table.column_names}


def concat_arrays(parts: Sequence[Arrays]) -> Arrays:
    """Rows of several reads (tasks) with the same columns -> one set of columns."""
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def column_tensor(arr: pa.Array) -> torch.Tensor:
    """Featurized column -> a writable tensor with the dtypes training uses (see :func:`widen`)."""
    return widen(torch.from_numpy(np.array(column_array(arr))))  # a copy: Arrow buffers are read-only


def prefixed_tensors(feats: Mapping[str, pa.Array], prefix: str) -> Dict[str, torch.Tensor]:
    """The featurizer's ``<prefix><field>`` columns (e.g. ``cand.``) as ``{field: tensor}``."""
    return {k[len(prefix) :]: column_tensor(v) for k, v in feats.items() if k.startswith(prefix)}


def presence(feats: Mapping[str, pa.Array], spec: FeatureSpec) -> torch.Tensor:
    """The ``has.`` columns of every context field -> the [n, F] float32 presence mask, in spec order."""
    has = prefixed_tensors(feats, PRESENT)
    return torch.stack([has[f] for f in spec.context], dim=1).float()
