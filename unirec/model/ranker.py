"""The multi-task ranker: context encoder and candidate encoder feeding one shared tower and per-task heads.

::

    context fields + task_type --FieldEmbeddings--> [B, Fc+1, D] --MLP--> c [B, H]   (once per request)
    candidate fields           --FieldEmbeddings--> [B, Fi, D]   --MLP--> v [B, H]   (per candidate)
                               (one embedding group and encoder per candidate type, + a type vector)
    c += attend(history, v)    (only with target-aware pooling of a sequence field: [B, H] or [R, N, H])
    x0 = [c, v, c * v] [B, 3H] --tower--> [B, 3H] or [B, K, 3H] --TaskHeads--> [B, K] -> own task's logit
                               (serving: only each row's own head runs, TaskHeads.pick -> [B])

Embedding tables live apart from the fields (``tables``): every field names one, and fields that name the
same table (the user's history, ``source_item`` and the candidate item id) share its rows.

The context path never sees the candidate, so a service encodes a request's context once and broadcasts
it over N candidates (:meth:`MultiTaskRanker.score_candidates`). Target-aware pooling keeps that: the
history is encoded once per request (:meth:`MultiTaskRanker.context_memory`) and attended by the N
candidates in one batched operation.

Heterogeneous candidates: each candidate type (items, genres, ...) has its own fields, embeddings and
encoder into the same H-wide space, plus a learned candidate-type vector, so one tower and one set of task
heads rank every type. A training batch mixes rows of several types; every type's encoder then runs on
every row and each row keeps its own type's vector (the other encoders see sentinels and get no gradient
from that row), so every parameter is in every step's graph, as DDP needs.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from unirec.config import ModelConfig
from unirec.kinds import EmbeddingOptions
from unirec.model.embeddings import FieldEmbeddings, build_tables
from unirec.model.heads import TaskHeads
from unirec.model.pooling import INIT_STD
from unirec.model.towers import build_tower
from unirec.model.transitions import PRIOR, TransitionPrior, build_prior
from unirec.schema import FeatureSpec

Memory = Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]
"""Target-aware field -> its history encoded once per request (tensors [R, L, ...], the mask [R, L] last),
see :meth:`MultiTaskRanker.context_memory`."""


BLOCK_PAIRS = 4096
"""(request, candidate) pairs :meth:`MultiTaskRanker.score_matrix` sends through the attention and the tower
at once. The pair activations of a whole ranking are hundreds of MB and every elementwise op of the tower
would stream them from memory; blocks of a few MB stay in cache. On one CPU thread a full ranking of
MovieLens (1,682 items) ran 3x faster in blocks of 4,096 pairs than in one piece (BENCHMARKS.md)."""


def _mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.ReLU(), nn.Linear(out, out))


class MultiTaskRanker(nn.Module):
    """Scores (context, candidate) pairs for every task with one shared network.

    Args:
        spec: the fitted feature spec (field sizes, tasks); input widths come from here, not from config.
        cfg: model shape.

    Shapes (B rows, K tasks):
        forward(batch) -> [B] logits of each row's own task
        all_logits(batch) -> [B, K] logits of every head
        head_logits(c, v, head) -> [M] each row's own head only (serving, micro-batches)

    Example:
        >>> from unirec.schema import FeatureSpec, FieldSpec, TaskSpec, CandidateSpec, TableSpec
        >>> spec = FeatureSpec(
        ...     context={"user": FieldSpec("user", "categorical", table="user")},
        ...     candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        ...     candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        ...     tasks={"home": TaskSpec("home", 0, "item", ("user",))},
        ...     tables={"user": TableSpec("user", 5), "item": TableSpec("item", 7)})
        >>> m = MultiTaskRanker(spec, ModelConfig(embedding_dim=4, hidden_dim=8))
        >>> c = m.encode_context({"user": torch.tensor([1])}, torch.ones(1, 1), torch.tensor([0]))
        >>> m.score_candidates(c, {"item": torch.tensor([2, 3, 4])}, torch.tensor([0])).shape
        torch.Size([3])
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = False):
        super().__init__()
        d, h = cfg.embedding_dim, cfg.hidden_dim
        self.task_names = list(spec.tasks)
        opts = EmbeddingOptions(
            d, h, cfg.sequence_pooling, cfg.sequence_layers, cfg.sequence_heads, cfg.dropout
        )
        self.tables = build_tables(spec.tables, d, sparse)
        self.context_embedding = FieldEmbeddings(spec.context, opts)
        self.task_embedding = nn.Embedding(spec.num_task_types, d, sparse=sparse)
        nn.init.normal_(self.task_embedding.weight, std=INIT_STD)
        self.candidate_types = list(spec.candidates)
        self.candidate_embedding = nn.ModuleDict(
            {
                c: FieldEmbeddings({f: spec.candidate_fields[f] for f in cs.fields}, opts, masked=False)
                for c, cs in spec.candidates.items()
            }
        )
        self.candidate_encoder = nn.ModuleDict(
            {c: _mlp(emb.num_fields * d, h) for c, emb in self.candidate_embedding.items()}
        )
        # Only with several types: a lone type's vector would be a constant the encoder already has.
        self.candidate_type_embedding = (
            nn.Embedding(len(self.candidate_types), h) if len(self.candidate_types) > 1 else None
        )
        if self.candidate_type_embedding is not None:
            nn.init.normal_(self.candidate_type_embedding.weight, std=INIT_STD)
        n_ctx = self.context_embedding.num_fields
        # The presence mask goes in beside the embeddings so the encoder can tell which fields it has.
        self.context_encoder = _mlp((n_ctx + 1) * d + n_ctx, h)
        self.tower = build_tower(
            cfg.tower,
            3 * h,
            len(self.task_names),
            cfg.tower_layers,
            cfg.experts,
            cfg.dropout,
            cfg.expert_dims,
        )
        self.heads = TaskHeads(self.task_names, getattr(self.tower, "out_width", 3 * h), cfg.head_hidden)
        self.dot_product = cfg.dot_product
        head_of = torch.full((spec.num_task_types,), -1, dtype=torch.long)
        for i, name in enumerate(self.task_names):
            head_of[spec.tasks[name].id] = i
        self.register_buffer("head_of_type", head_of, persistent=False)
        ctype_of = torch.zeros(spec.num_task_types, dtype=torch.long)
        for t in spec.tasks.values():
            ctype_of[t.id] = self.candidate_types.index(t.candidate)
        self.register_buffer("candidate_type_of_task", ctype_of, persistent=False)
        self.transitions: Optional[TransitionPrior] = None
        if cfg.transitions:
            self.transitions = build_prior(spec, cfg, self.task_names)

    def encode_context(
        self,
        context: Dict[str, torch.Tensor],
        present: torch.Tensor,
        task_type: torch.Tensor,
        memory: Memory = None,
    ):
        """Context fields [B, ...], presence [B, Fc], task_type [B] -> context vector [B, H]; ``memory``:
        the same rows' :meth:`context_memory`, if already computed (see :meth:`encode_request`)."""
        emb = self.context_embedding(context, self.tables, present, memory)
        task = self.task_embedding(task_type).unsqueeze(1)
        x = torch.cat([emb, task], dim=1).flatten(1)
        return self.context_encoder(torch.cat([x, present.to(x.dtype)], dim=1))

    def encode_candidates(
        self, candidate: Dict[str, torch.Tensor], ctype: Optional[str] = None
    ) -> torch.Tensor:
        """Candidate fields [N, ...] of one candidate type -> candidate vectors [N, H].

        ``ctype`` may be left out when the model has one candidate type."""
        if ctype is None:
            if len(self.candidate_types) > 1:
                raise ValueError(f"name the candidate type: the model ranks {self.candidate_types}")
            ctype = self.candidate_types[0]
        v = self.candidate_encoder[ctype](self.candidate_embedding[ctype](candidate, self.tables).flatten(1))
        if self.candidate_type_embedding is None:
            return v
        return v + self.candidate_type_embedding.weight[self.candidate_types.index(ctype)]

    def encode_rows(self, candidate: Dict[str, torch.Tensor], task_type: torch.Tensor) -> torch.Tensor:
        """Candidate fields [B, ...] of rows of mixed tasks (each row holds its own type's fields, sentinels
        in the others) -> [B, H], each row encoded as its task's candidate type."""
        if len(self.candidate_types) == 1:
            return self.encode_candidates(candidate, self.candidate_types[0])
        row_type = self.candidate_type_of_task[task_type].unsqueeze(1)
        v = None
        for i, c in enumerate(self.candidate_types):
            vc = self.encode_candidates({f: candidate[f] for f in self.candidate_embedding[c].names}, c)
            v = vc if v is None else torch.where(row_type == i, vc, v)
        return v

    def interact(self, c: torch.Tensor, v: torch.Tensor, task_type: torch.Tensor) -> torch.Tensor:
        """Context [B, H] and candidate [B, H] vectors of rows of task_type [B] -> every head's logit [B, K]."""
        logits = self.heads(self.tower(torch.cat([c, v, c * v], dim=1), self.head_index(task_type)))
        return logits + self.dot(c, v).unsqueeze(1) if self.dot_product else logits

    def dot(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Context [M, H] and candidate [M, H] vectors -> [M] ``<c, v> / sqrt(H)``: with
        ``model.dot_product``, a term of every head's logit, which a full-catalogue softmax can train for
        the price of one matrix product (:meth:`catalogue_logits`)."""
        return (c * v).sum(-1) / math.sqrt(c.shape[-1])

    def catalogue_logits(
        self, c: torch.Tensor, candidate: Dict[str, torch.Tensor], ctype: str
    ) -> torch.Tensor:
        """Rows' context vectors [P, H] (before any target-aware attention) against a whole catalogue of one
        candidate type (its fields [C, ...]) -> [P, C] :meth:`dot` terms, the catalogue encoded once."""
        return c @ self.encode_candidates(candidate, ctype).T / math.sqrt(c.shape[-1])

    def head_index(self, task_type: torch.Tensor) -> torch.Tensor:
        return self.head_of_type[task_type]

    def context_memory(self, context: Dict[str, torch.Tensor], present: torch.Tensor) -> Memory:
        """What target-aware fields attend over, encoded once per request, and the transition prior's
        rows (:data:`unirec.model.transitions.PRIOR`; empty without either)."""
        memory = {}
        if self.context_embedding.target_aware:
            memory = self.context_embedding.memories(context, self.tables, present)
        if self._prior_on():
            memory[PRIOR] = (self.transitions.request_rows(context),)
        return memory

    def _prior_on(self) -> bool:
        """Whether logits get the transition prior now: always in eval mode; in training mode only when
        its weights are learned (``transitions_fit=learned``), so a prior fitted on valid leaves the
        network to train alone, as it would without it."""
        return self.transitions is not None and (not self.training or self.transitions.in_training)

    def encode_request(
        self, context: Dict[str, torch.Tensor], present: torch.Tensor, task_type: torch.Tensor
    ) -> Tuple[torch.Tensor, Memory]:
        """:meth:`encode_context` and :meth:`context_memory` together, the history encoded once for both."""
        memory = self.context_memory(context, present)
        return self.encode_context(context, present, task_type, memory), memory

    def all_logits(self, batch) -> torch.Tensor:
        logits = self._row_logits(*self._encode(batch), batch.task_type)
        if not self._prior_on():
            return logits
        prior = self._own_prior(batch)
        return logits + (self.transitions.weight * self.transitions.uses) * prior.unsqueeze(1)

    def _own_prior(self, batch) -> torch.Tensor:
        """[B] each row's transition prior for its own candidate; in training mode a positive row's own
        transition is left out of the counts (:mod:`unirec.model.transitions`)."""
        leave_out = batch.label > 0 if self.training and batch.label is not None else None
        ids = batch.candidate[self.transitions.id_field]
        return self.transitions.own(batch.context, ids, leave_out)

    def _encode(self, batch):
        c, memory = self.encode_request(batch.context, batch.present, batch.task_type)
        return c, self.encode_rows(batch.candidate, batch.task_type), memory

    def _row_logits(self, c: torch.Tensor, v: torch.Tensor, memory: Memory, task_type: torch.Tensor):
        for name, mem in _attention(memory).items():
            c = c + self.context_embedding.fields[name].attend_rows(mem, v)
        return self.interact(c, v, task_type)

    def forward(
        self,
        batch,
        pools: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
        catalogues: Optional[Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor], str]]] = None,
    ):
        """Each row's own-task logit [B]; with ``pools``, also the pair logits of a sampled softmax.

        ``pools``: (rows [P], pool [M]) index pairs into the batch, all rows of one pair of one task: each
        row's context is scored against every pool row's candidate (the batch's other candidates, for
        in-batch negatives), encoded once with the rest of the batch. Returns then (logits [B], a list of
        [P, M] logits). ``catalogues``: (rows [P], a catalogue's candidate fields, its type) triples; the
        rows' :meth:`catalogue_logits` [P, C] are returned third. One call through ``forward`` keeps
        DDP's gradient hooks on every parameter.
        """
        c, v, memory = self._encode(batch)
        own = self._own_logits(c, v, memory, batch)
        ids = batch.candidate[self.transitions.id_field] if self._prior_on() else None
        if pools is None and catalogues is None:
            return own
        pairs = []
        for (rows, pool), mem in zip(pools or (), _pool_memories(memory, pools or ())):
            pool_ids = None if ids is None else ids[pool]
            pairs.append(self.score_matrix(c[rows], v[pool], batch.task_type[rows], mem, pool_ids))
        if catalogues is None:
            return own, pairs
        return own, pairs, [self.catalogue_logits(c[rows], cand, ct) for rows, cand, ct in catalogues]

    def request_logits(self, batch) -> torch.Tensor:
        """:meth:`forward`'s own-task logits [B] (no pools), with each request's context encoded once for
        all its rows: rows of one (request_id, task_type) share one context by construction (the labels
        join a request's context onto each of its candidates), and an evaluation batch holds about a
        hundred rows a request, whose history projections would otherwise be recomputed on every row."""
        key = torch.stack([batch.request_id, batch.task_type])
        _, inverse = torch.unique(key, dim=1, return_inverse=True)
        rows = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((int(inverse.max()) + 1,), len(inverse), device=inverse.device)
        first = first.scatter_reduce(0, inverse, rows, "amin")
        context = {k: t[first] for k, t in batch.context.items()}
        c, memory = self.encode_request(context, batch.present[first], batch.task_type[first])
        v = self.encode_rows(batch.candidate, batch.task_type)
        rowwise = {name: tuple(t[inverse] for t in m) for name, m in _attention(memory).items()}
        return self._own_logits(c[inverse], v, rowwise, batch)

    def _own_logits(self, c: torch.Tensor, v: torch.Tensor, memory: Memory, batch) -> torch.Tensor:
        """Rows' context [B, H] (one per row) and candidate [B, H] vectors -> [B] logits of each row's own
        head, its own transition prior added when the prior is on."""
        own = self._row_logits(c, v, memory, batch.task_type)
        head = self.head_index(batch.task_type)
        own = own.gather(1, head.unsqueeze(1)).squeeze(1)
        if self._prior_on():
            own = own + self.transitions.coefficient(head) * self._own_prior(batch)
        return own

    def score_candidates(
        self,
        c: torch.Tensor,
        candidate: Dict[str, torch.Tensor],
        task_type: torch.Tensor,
        memory: Memory = None,
    ):
        """One request's context vector [1, H] against N candidates (of its task's type) -> [N] logits."""
        ctype = self.candidate_types[int(self.candidate_type_of_task[task_type.reshape(-1)[0]])]
        ids = candidate.get(self.transitions.id_field) if self.transitions is not None else None
        return self.score_vectors(c, self.encode_candidates(candidate, ctype), task_type, memory, ids)

    def score_vectors(
        self,
        c: torch.Tensor,
        v: torch.Tensor,
        task_type: torch.Tensor,
        memory: Memory = None,
        ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One request's context vector [1, H] against N encoded candidates [N, H] (e.g. a catalogue
        encoded once) -> [N] logits of that request's task; ``memory``: its :meth:`context_memory`;
        ``ids``: the candidates' id rows [N], which the transition prior needs (see :meth:`prior_logits`)."""
        return self.score_matrix(c, v, task_type, memory, ids)[0]

    def score_matrix(
        self,
        c: torch.Tensor,
        v: torch.Tensor,
        task_type: torch.Tensor,
        memory: Memory = None,
        ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """R requests' context vectors [R, H] against the same N encoded candidates [N, H] -> [R, N] logits,
        each row from its own request's task head (task_type [R]); full-catalogue ranking uses this.
        ``ids``: the candidates' id rows [N] (for the transition prior, :meth:`prior_logits`)."""
        r, n = c.shape[0], v.shape[0]
        head = self.head_index(task_type)
        prior = self.prior_logits(memory, ids, head)
        if r == 1:  # the serving path: no copies of v
            out = self.head_logits(self.request_rows(c, v, memory), v, head.expand(n)).view(1, n)
        else:
            step = max(1, BLOCK_PAIRS // max(1, n))
            out = torch.cat(
                [
                    self._block_logits(c[a : a + step], v, head[a : a + step], _rows_of(memory, a, step))
                    for a in range(0, r, step)
                ]
            )
        return out if prior is None else out + prior

    def _block_logits(self, c: torch.Tensor, v: torch.Tensor, head: torch.Tensor, memory: Memory):
        """:meth:`score_matrix`'s network part for one block of requests: [r, H] x [N, H] -> [r, N]."""
        r, n = c.shape[0], v.shape[0]
        attended = self._attended(v, memory)
        cs = c.unsqueeze(1).expand(r, n, -1)
        cs = (cs if attended is None else cs + attended).reshape(r * n, -1)
        return self.head_logits(cs, v.repeat(r, 1), head.repeat_interleave(n)).view(r, n)

    def prior_logits(
        self, memory: Memory, ids: Optional[torch.Tensor], head: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The transition prior's term [R, N] of R requests (their ``memory``, heads [R]) for candidates
        whose id rows are ``ids`` ([N], or [R, N]); None when the model has no prior or none of the heads
        uses it (then ``ids`` may be None)."""
        if not self._prior_on() or not bool(self.transitions.uses[head].any()):
            return None
        if memory is None or PRIOR not in memory or ids is None:
            raise ValueError(
                "the model adds a transition prior (model.transitions): pass "
                "memory=model.context_memory(context, present) and the candidates' id rows as ids"
            )
        return self.transitions.logits(memory[PRIOR][0], ids, head)

    def request_rows(self, c: torch.Tensor, v: torch.Tensor, memory: Memory = None) -> torch.Tensor:
        """One request's context vector [1, H] as each of its N candidates [N, H] sees it -> [N, H]: the
        same vector broadcast (a view), plus the target-aware attention of the request's ``memory``."""
        attended = self._attended(v, memory)
        return c.expand(v.shape[0], -1) if attended is None else c + attended[0]

    def head_logits(self, c: torch.Tensor, v: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Rows' context [M, H] and candidate [M, H] vectors and head indices [M] -> [M] logits of each row's
        own head; only the heads the rows name run (one when the rows are one task's), unlike :meth:`interact`.
        Serving merges several requests of one task into one call (their :meth:`request_rows` stacked)."""
        logits = self.heads.pick(self.tower(torch.cat([c, v, c * v], dim=1), head), head)
        return logits + self.dot(c, v) if self.dot_product else logits

    def _attended(self, v: torch.Tensor, memory: Memory) -> Optional[torch.Tensor]:
        """The target-aware fields' attention of N candidates [N, H] over R requests' memory -> [R, N, H]."""
        if memory is None and self.context_embedding.target_aware:
            # Without it the target-aware part would be silently left out of the scores.
            raise ValueError(
                f"fields {self.context_embedding.target_aware} pool against each candidate: pass "
                "memory=model.context_memory(context, present)"
            )
        attended = None
        for name, mem in _attention(memory).items():
            a = self.context_embedding.fields[name].attend_all(mem, v)  # [R, N, H]
            attended = a if attended is None else attended + a
        return attended


def _rows_of(memory: Memory, start: int, count: int) -> Memory:
    """Requests ``start`` to ``start + count`` of a memory (every tensor's first axis is the request)."""
    if not memory:
        return memory
    return {name: tuple(t[start : start + count] for t in m) for name, m in memory.items()}


def _attention(memory: Memory) -> Dict[str, Tuple[torch.Tensor, ...]]:
    """The target-aware fields' part of a memory (without the transition prior's rows)."""
    return {name: m for name, m in (memory or {}).items() if name != PRIOR}


def _pool_memories(memory: Memory, pools: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> List[Memory]:
    """Each pool's rows of the batch's ``memory``, gathered once for all pools and split: the backward of a
    gather allocates a zero gradient of the whole memory ([B, L, D] for a history), so one gather instead
    of one per pool saves that fill and its accumulation per pool on every step."""
    if not pools or not memory:
        return [{} for _ in pools]
    sizes = [len(rows) for rows, _ in pools]
    every = torch.cat([rows for rows, _ in pools])
    split = {name: [t[every].split(sizes) for t in m] for name, m in memory.items()}
    return [{name: tuple(parts[i] for parts in ts) for name, ts in split.items()} for i in range(len(pools))]
