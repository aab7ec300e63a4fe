"""Device-resident task streams: a task's whole train share held as tensors on the training device.

For data that fits on the card, the data path becomes a permutation and an ``index_select`` per column on
the device: no parquet decoding, no host-to-device copies, no loader thread. Same contract as
:class:`unirec.data.loader.TaskStream`: every row once per epoch (in a fresh permutation), the ranks
partition the rows, and :meth:`state` / :meth:`load_state` resume at the exact row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

Tensors = Dict[str, torch.Tensor]
# Ids become int64 once, at load time, so batches need no conversion.
_WIDEN = {torch.int32: torch.int64, torch.int16: torch.int64, torch.uint8: torch.float32}


class ResidentStream:
    """Endless shuffled rows of one task, held on ``device``.

    Args:
        files: the task's shard files.
        seed: seeds the per-epoch permutations.
        device: where the rows live.
        rank, world: this process's share of the rows (every world-th row of each file).
    """

    def __init__(self, files: Sequence[Path], seed: int, device: torch.device, rank: int = 0, world: int = 1):
        from unirec.data.batch import table_to_arrays

        cols = table_to_arrays(pq.read_table([str(f) for f in files]))
        keep = np.arange(rank, len(cols["label"]), world)
        self.cols: Tensors = {}
        for name, values in cols.items():
            t = torch.from_numpy(np.ascontiguousarray(values[keep]))
            self.cols[name] = t.to(_WIDEN.get(t.dtype, t.dtype)).to(device)
        self.n = len(keep)
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self._cursor = 0, self.n
        self._perm_gen_state = self.gen.get_state()
        self._perm = torch.arange(self.n, device=device)

    def take(self, n: int) -> Tensors:
        parts = []
        while n > 0:
            if self._cursor >= self.n:
                self._new_epoch()
            k = min(n, self.n - self._cursor)
            parts.append(self._perm[self._cursor : self._cursor + k])
            self._cursor += k
            n -= k
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        return {name: col.index_select(0, idx) for name, col in self.cols.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self._cursor, "perm_gen": self._perm_gen_state.tolist()}

    def load_state(self, state: dict) -> None:
        self.epoch, self._cursor = state["epoch"], state["cursor"]
        self._perm_gen_state = torch.tensor(state["perm_gen"], dtype=torch.uint8)
        self.gen.set_state(self._perm_gen_state)
        if self.epoch > 0:  # rebuild the current epoch's permutation; before the first, draw nothing
            self._perm = torch.randperm(self.n, generator=self.gen).to(self.device)

    def _new_epoch(self) -> None:
        self._perm_gen_state = self.gen.get_state()
        self._perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        self.epoch += 1
        self._cursor = 0
