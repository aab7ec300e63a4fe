"""The embedding trunk: one table per field, bags for token fields, learned "missing" vectors."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from unirec.schema import SENTINEL, FieldSpec

INIT_STD = 0.05


class FieldEmbeddings(nn.Module):
    """Embeds a group of fields (the context, or a candidate type's fields) into one [B, F, D] tensor.

    Categorical fields look up one row; token fields average a bag (the sentinel pads); dense fields are
    scaled by a learned vector. Where a field is absent (``present == 0``) its learned missing vector
    stands in, so "missing" is never confused with any real value.

    Args:
        fields: field name -> fitted spec, in a fixed order.
        dim: embedding width D.
        sparse: sparse gradients for the tables (pair with SparseAdam).
        masked: learn a missing vector per field, used where ``present == 0`` (context fields); candidate
            fields come from a catalogue and use the plain sentinel instead.

    Shapes:
        inputs[f]: [B] int64, [B, L] int64 (tokens) or [B] float32 (dense); present: [B, F] -> [B, F, D]

    Example:
        >>> from unirec.schema import FieldSpec
        >>> emb = FieldEmbeddings({"user": FieldSpec("user", "categorical", size=10)}, dim=4)
        >>> emb({"user": torch.tensor([0, 3])}, torch.tensor([[0.0], [1.0]])).shape
        torch.Size([2, 1, 4])
    """

    def __init__(self, fields: Mapping[str, FieldSpec], dim: int, sparse: bool = False, masked: bool = True):
        super().__init__()
        self.names = list(fields)
        self.kinds = {name: f.kind for name, f in fields.items()}
        self.tables = nn.ModuleDict()
        self.scales = nn.ParameterDict()
        for name, f in fields.items():
            if f.kind == "categorical":
                self.tables[name] = nn.Embedding(f.size, dim, sparse=sparse)
            elif f.kind == "tokens":
                self.tables[name] = nn.EmbeddingBag(
                    f.size, dim, mode="mean", padding_idx=SENTINEL, sparse=sparse
                )
            else:
                self.scales[name] = nn.Parameter(torch.randn(dim) * INIT_STD)
        self.missing = nn.Parameter(torch.randn(len(self.names), dim) * INIT_STD) if masked else None
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=INIT_STD)

    @property
    def num_fields(self) -> int:
        return len(self.names)

    def forward(
        self, inputs: Dict[str, torch.Tensor], present: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        out = []
        for name in self.names:
            x = inputs[name]
            if self.kinds[name] == "dense":
                out.append(x.unsqueeze(-1).to(self.scales[name].dtype) * self.scales[name])
            else:
                out.append(self.tables[name](x))
        emb = torch.stack(out, dim=1)
        if present is None or self.missing is None:
            return emb
        return torch.where(present.unsqueeze(-1) > 0, emb, self.missing.to(emb.dtype))
