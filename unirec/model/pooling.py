"""The embedding and pooling modules of the field kinds (:mod:`unirec.kinds` picks one per field).

Every module maps a field's tensor and the embedding table the field reads to one [B, D] vector per row:
``forward(x, table)``. Tables are passed in, not owned, since several fields share one. A target-aware
module (:class:`TargetAttention`) also pools the history against each candidate.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from unirec.kinds import SENTINEL, EmbeddingOptions

INIT_STD = 0.05


class Lookup(nn.Module):
    """One row of the table per id: [B] -> [B, D]."""

    def forward(self, x: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        return table(x)


class Bag(nn.Module):
    """Mean of a bag's rows, the sentinel padding left out: [B, L] -> [B, D]."""

    def forward(self, x: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        return F.embedding_bag(x, table.weight, mode="mean", padding_idx=SENTINEL, sparse=table.sparse)


class Scale(nn.Module):
    """A standardised float times a learned vector: [B] -> [B, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim) * INIT_STD)

    def forward(self, x: torch.Tensor, table=None) -> torch.Tensor:
        return x.unsqueeze(-1).to(self.scale.dtype) * self.scale


def _masked_mean(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] rows averaged over the positions where ``mask`` [B, L] is true (zeros where none is)."""
    w = mask.to(e.dtype).unsqueeze(-1)
    return (e * w).sum(1) / w.sum(1).clamp_min(1.0)


class MeanPool(nn.Module):
    """Masked mean of a sequence's rows: [B, L] -> [B, D]."""

    def __init__(self, max_len: int = 0, opts: EmbeddingOptions = None):
        super().__init__()

    def forward(self, x: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        return _masked_mean(table(x), x != SENTINEL)


class CausalEncoder(nn.Module):
    """A small causal self-attention encoder over a left-padded sequence; its last position (the most
    recent event, which attends to every earlier one) is the user's state: [B, L] -> [B, D]."""

    def __init__(self, max_len: int, opts: EmbeddingOptions):
        super().__init__()
        if opts.dim % opts.heads:
            raise ValueError(f"model.sequence_heads={opts.heads} must divide model.embedding_dim={opts.dim}")
        self.heads, self.dropout = opts.heads, opts.dropout
        self.position = nn.Parameter(torch.randn(max_len, opts.dim) * INIT_STD)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(opts.dim),
                    "qkv": nn.Linear(opts.dim, 3 * opts.dim),
                    "proj": nn.Linear(opts.dim, opts.dim),
                    "norm2": nn.LayerNorm(opts.dim),
                    "ff": nn.Sequential(
                        nn.Linear(opts.dim, 2 * opts.dim), nn.GELU(), nn.Linear(2 * opts.dim, opts.dim)
                    ),
                }
            )
            for _ in range(opts.layers)
        )
        self.norm = nn.LayerNorm(opts.dim)

    def forward(self, x: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        b, n = x.shape
        valid = x != SENTINEL
        # An empty history attends to its own (sentinel) last slot, so no row's softmax is over nothing;
        # the presence mask replaces its output by the field's missing vector anyway.
        valid = valid | (~valid.any(1, keepdim=True) & (torch.arange(n, device=x.device) == n - 1))
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        allowed = (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)  # [B, 1, L, L]
        h = table(x) + self.position
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](h)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            h = h + F.dropout(blk["proj"](a.transpose(1, 2).reshape(b, n, -1)), self.dropout, self.training)
            h = h + F.dropout(blk["ff"](blk["norm2"](h)), self.dropout, self.training)
        return self.norm(h[:, -1])


class TargetAttention(nn.Module):
    """Target-aware pooling (DIN-style). Per candidate: :meth:`attend` weighs the history by its affinity
    to the candidate's vector, for N candidates in one batched operation against the history encoded once
    (:meth:`memory`). In the context slot (candidate-independent, so the context is still encoded once per
    request): the same attention with one learned query in place of the candidate's, which starts as the
    masked mean.

    Every slot carries its recency, in its key and its value (a learned vector per position; the sequence
    is right-aligned, so a position is "the k-th most recent"): a candidate can weigh the last few events
    above older ones, which a bag of item vectors cannot express."""

    def __init__(self, max_len: int, opts: EmbeddingOptions):
        super().__init__()
        self.query = nn.Linear(opts.hidden, opts.dim)
        self.key = nn.Linear(opts.dim, opts.dim)
        self.recency = nn.Parameter(torch.randn(max_len, opts.dim) * INIT_STD)
        self.slot = nn.Parameter(torch.zeros(opts.dim))
        self.out = nn.Linear(opts.dim, opts.hidden)

    def forward(self, x: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        return self.pool(self.memory(x, table))

    def pool(self, memory: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The context slot from the history already encoded (:meth:`memory`) -> [R, D]."""
        e, k, mask = memory
        logits = (k * self.slot).sum(-1) / math.sqrt(e.shape[-1])
        return _weighted_sum(_masked_softmax(logits, mask), e)

    def memory(self, x: torch.Tensor, table: nn.Embedding) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """History ids [R, L] -> (values [R, L, D], keys [R, L, D], mask [R, L]).

        The key is linear, so ``key(row + recency) = W row + key(recency)``: where the table has fewer rows
        than the batch has slots (a training or evaluation batch over a catalogue of thousands), its rows
        are projected once and looked up, instead of projecting every slot."""
        e = table(x) + self.recency
        if table.sparse or table.num_embeddings > x.numel():
            return e, self.key(e), x != SENTINEL
        k = F.embedding(x, F.linear(table.weight, self.key.weight)) + self.key(self.recency)
        return e, k, x != SENTINEL

    def attend_rows(self, memory: Tuple[torch.Tensor, ...], v: torch.Tensor) -> torch.Tensor:
        """Each row's candidate vector [R, H] against its own history -> a context correction [R, H]."""
        e, k, mask = memory
        logits = (k * self.query(v).unsqueeze(1)).sum(-1) / math.sqrt(e.shape[-1])
        return self.out(_weighted_sum(_masked_softmax(logits, mask), e))

    def attend_all(self, memory: Tuple[torch.Tensor, ...], v: torch.Tensor) -> torch.Tensor:
        """The same N candidate vectors [N, H] against each of R histories -> corrections [R, N, H]."""
        e, k, mask = memory
        logits = torch.einsum("nd,rld->rnl", self.query(v), k) / math.sqrt(e.shape[-1])
        return self.out(torch.einsum("rnl,rld->rnd", _masked_softmax(logits, mask.unsqueeze(1)), e))


def _weighted_sum(w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Weights [R, L] over rows [R, L, D] -> [R, D]. Broadcast and summed rather than a batched matrix
    product: the backward of ``bmm`` with an inner size of 1 is an outer product that CPU kernels run
    several times slower than the same elementwise product."""
    return (w.unsqueeze(-1) * e).sum(1)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask``; all-zero weights where a row has no true position."""
    logits = logits.masked_fill(~mask, -1e9)
    return torch.softmax(logits, -1) * mask.any(-1, keepdim=True).to(logits.dtype)


SEQUENCE_POOLINGS: Dict[str, Type[nn.Module]] = {
    "mean": MeanPool,
    "attention": TargetAttention,
    "transformer": CausalEncoder,
}
"""``model.sequence_pooling`` -> module: the only list of the poolings."""
