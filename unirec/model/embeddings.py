"""The embedding trunk: tables apart from fields, each field embedded by its kind, learned "missing" vectors."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from unirec.kinds import EmbeddingOptions, kind_of
from unirec.model.pooling import INIT_STD
from unirec.schema import FieldSpec, TableSpec


def build_tables(tables: Mapping[str, TableSpec], dim: int, sparse: bool = False) -> nn.ModuleDict:
    """One ``nn.Embedding`` per table, shared by every field that names it.

    >>> from unirec.schema import TableSpec
    >>> build_tables({"item": TableSpec("item", size=7)}, dim=4)["item"].weight.shape
    torch.Size([7, 4])
    """
    out = nn.ModuleDict()
    for name, t in tables.items():
        out[name] = nn.Embedding(t.size, dim, sparse=sparse)
        nn.init.normal_(out[name].weight, std=INIT_STD)
    return out


class FieldEmbeddings(nn.Module):
    """Embeds a group of fields (the context, or a candidate type's fields) into one [B, F, D] tensor.

    Each field's kind builds its module (a lookup, a bag, a scaled float, a pooled sequence) over the table
    the field names; tables are passed in at call time because fields of several groups share them. Where
    a field is absent (``present == 0``) its learned missing vector stands in, so "missing" is never
    confused with any real value.

    Args:
        fields: field name -> fitted spec, in a fixed order.
        opts: widths and pooling (see :class:`unirec.kinds.EmbeddingOptions`).
        masked: learn a missing vector per field, used where ``present == 0`` (context fields); candidate
            fields come from a catalogue and use the plain sentinel instead.

    Shapes:
        inputs[f]: the kind's tensor, e.g. [B] int64, [B, L] int64 or [B] float32; present: [B, F]
        -> [B, F, D]

    Example:
        >>> from unirec.schema import FieldSpec, TableSpec
        >>> tables = build_tables({"user": TableSpec("user", size=10)}, dim=4)
        >>> emb = FieldEmbeddings({"user": FieldSpec("user", "categorical", table="user")}, EmbeddingOptions(4))
        >>> emb({"user": torch.tensor([0, 3])}, tables, torch.tensor([[0.0], [1.0]])).shape
        torch.Size([2, 1, 4])
    """

    def __init__(self, fields: Mapping[str, FieldSpec], opts: EmbeddingOptions, masked: bool = True):
        super().__init__()
        self.names = list(fields)
        self.table_of = {name: f.table for name, f in fields.items()}
        self.fields = nn.ModuleDict({name: kind_of(f).module(f, opts) for name, f in fields.items()})
        # A field module that also attends to each candidate (target-aware pooling) says so by its methods.
        self.target_aware = [n for n in self.names if hasattr(self.fields[n], "attend_rows")]
        self.missing = nn.Parameter(torch.randn(len(self.names), opts.dim) * INIT_STD) if masked else None

    @property
    def num_fields(self) -> int:
        return len(self.names)

    def forward(
        self,
        inputs: Dict[str, torch.Tensor],
        tables: nn.ModuleDict,
        present: Optional[torch.Tensor] = None,
        memories: Optional[Dict[str, tuple]] = None,
    ) -> torch.Tensor:
        """``memories``: the target-aware fields' :meth:`memories` of the same rows, when already computed:
        their slots are pooled from them instead of encoding the history a second time."""
        memories = memories or {}
        out = [
            self.fields[n].pool(memories[n])
            if n in memories
            else self.fields[n](inputs[n], self._table(tables, n))
            for n in self.names
        ]
        emb = torch.stack(out, dim=1)
        if present is None or self.missing is None:
            return emb
        return torch.where(present.unsqueeze(-1) > 0, emb, self.missing.to(emb.dtype))

    def memories(self, inputs: Dict[str, torch.Tensor], tables: nn.ModuleDict, present: torch.Tensor):
        """What the target-aware fields attend over: field -> (tensors [R, L, ...]..., mask [R, L]), the
        mask last (the field's module says what comes before it); an absent field's mask is all false, so
        it contributes nothing."""
        out = {}
        for n in self.target_aware:
            *rows, mask = self.fields[n].memory(inputs[n], self._table(tables, n))
            out[n] = (*rows, mask & (present[:, self.names.index(n)] > 0).unsqueeze(1))
        return out

    def _table(self, tables: nn.ModuleDict, name: str):
        t = self.table_of[name]
        return tables[t] if t is not None else None
