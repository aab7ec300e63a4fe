"""Training and evaluation batches from feature shards: whole Arrow record batches, no per-row Python.

Training draws each batch's task composition from a seeded multinomial over the tasks (the *mix*), then
takes that many rows from each task's stream. A stream reads its row groups in a shuffled order each epoch
and shuffles within a bounded buffer, so memory stays bounded whatever the shard size.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unirec.config import LoaderConfig, MixStrategy
from unirec.data.batch import Arrays, Batch, concat_arrays, table_to_arrays, to_batch
from unirec.data.borrowing import Borrowing
from unirec.schema import FeatureSpec


def shard_files(features: Path, split: str, task: str) -> List[Path]:
    files = sorted((Path(features) / split / task).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no feature shards for task {task!r} split {split!r} under {features}")
    return files


def count_rows(files: Sequence[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


class TaskStream:
    """Endless shuffled rows of one task: row groups in a fresh random order each epoch, a bounded buffer.

    With several ranks, each takes every ``world``-th row of each row group (offset ``rank``), so the ranks
    partition every epoch exactly: no row twice, none left out. The stream's position is a small
    :meth:`state` (generator states, the epoch's remaining order, the row groups of the current buffer and
    the offset in it) from which :meth:`load_state` rebuilds the identical buffer, so a resumed run sees
    exactly the rows the interrupted one would have.

    Args:
        files: the task's shard files.
        buffer_rows: rows held for the shuffle (the memory bound).
        rng: the stream's own generator (seeded by the loader).
        rank, world: this process's share of every row group.
    """

    def __init__(
        self, files: Sequence[Path], buffer_rows: int, rng: np.random.Generator, rank: int = 0, world: int = 1
    ):
        self.units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
        self.buffer_rows = buffer_rows
        self.rng = rng
        self.rank, self.world = rank, world
        self.epoch = 0
        self._order: List[int] = []
        self._buf: Optional[Arrays] = None
        self._buf_units: List[int] = []
        self._buf_rng: Optional[dict] = None
        self._pos = 0
        self._files: Dict[Path, pq.ParquetFile] = {}

    def take(self, n: int) -> Arrays:
        parts = []
        while n > 0:
            if self._buf is None or self._pos >= _len(self._buf):
                self._refill()
            k = min(n, _len(self._buf) - self._pos)
            parts.append({c: v[self._pos : self._pos + k] for c, v in self._buf.items()})
            self._pos += k
            n -= k
        return parts[0] if len(parts) == 1 else concat_arrays(parts)

    def state(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "order": [int(i) for i in self._order],
            "buf_units": list(self._buf_units),
            "buf_rng": self._buf_rng,
            "pos": self._pos,
        }

    def load_state(self, state: dict) -> None:
        self.epoch, self._order = state["epoch"], list(state["order"])
        self._buf_units, self._buf_rng, self._pos = list(state["buf_units"]), state["buf_rng"], state["pos"]
        self._buf = None
        if self._buf_units:
            self.rng.bit_generator.state = self._buf_rng
            self._buf = self._shuffled(self._buf_units)
        self.rng.bit_generator.state = state["rng"]

    def _refill(self) -> None:
        # A buffer never spans two epochs, so every row is seen exactly once per epoch.
        if not self._order:
            self._order = [int(i) for i in self.rng.permutation(len(self.units))]
            self.epoch += 1
        units, rows = [], 0
        while self._order and (rows < self.buffer_rows or not units):
            units.append(self._order.pop())
            rows += self._unit_rows(units[-1])
        self._buf_units, self._buf_rng = units, self.rng.bit_generator.state
        self._buf = self._shuffled(units)
        self._pos = 0

    def _shuffled(self, units: List[int]) -> Arrays:
        buf = concat_arrays([self._read(u) for u in units])
        return {c: v[perm] for perm in [self.rng.permutation(_len(buf))] for c, v in buf.items()}

    def _read(self, unit: int) -> Arrays:
        f, g = self.units[unit]
        table = self._file(f).read_row_group(g)
        if self.world > 1:
            table = table.take(np.arange(self.rank, table.num_rows, self.world))
        return table_to_arrays(table)

    def _unit_rows(self, unit: int) -> int:
        f, g = self.units[unit]
        n = self._file(f).metadata.row_group(g).num_rows
        return len(range(self.rank, n, self.world))

    def _file(self, f: Path) -> pq.ParquetFile:
        return self._files.setdefault(f, pq.ParquetFile(f))


def mix_probabilities(
    rows: Mapping[str, int], cfg: LoaderConfig, weights: Mapping[str, float]
) -> Dict[str, float]:
    """Share of each task in a batch under the configured strategy.

    >>> from unirec.config import LoaderConfig, MixStrategy
    >>> mix_probabilities({"a": 300, "b": 100}, LoaderConfig(mix=MixStrategy.natural), {})
    {'a': 0.75, 'b': 0.25}
    >>> mix_probabilities({"a": 300, "b": 100}, LoaderConfig(mix=MixStrategy.uniform), {})
    {'a': 0.5, 'b': 0.5}
    """
    mix = MixStrategy(cfg.mix)
    names = sorted(rows)
    if mix == MixStrategy.natural:
        raw = [float(rows[t]) for t in names]
    elif mix == MixStrategy.uniform:
        raw = [1.0 for _ in names]
    elif mix == MixStrategy.temperature:
        raw = [float(rows[t]) ** cfg.alpha for t in names]
    else:
        raw = [float(weights[t]) for t in names]
    if any(r < 0 for r in raw) or sum(raw) <= 0:
        raise ValueError(f"loader.mix={mix.value}: task weights must be >= 0 with a positive sum, got {raw}")
    return {t: r / sum(raw) for t, r in zip(names, raw)}


class MixedLoader:
    """Endless training batches mixing tasks by ``mix_probabilities``; deterministic for a seed.

    Args:
        features: the features directory.
        spec: its feature spec.
        cfg: loader settings.
        weights: task name -> sampling_weight (for mix=weights).
        seed: seeds the task draws and every stream.
        rank, world: this process's share of the data under torchrun (see :class:`TaskStream`).
        device: where rows live with ``loader.resident`` (see :mod:`unirec.data.resident`).
        borrow: task name -> the tasks whose rows it borrows (``task.<name>.borrow``,
            :mod:`unirec.data.borrowing`): every batch carries their copies, made in the prefetch thread.
    """

    def __init__(
        self,
        features: Path,
        spec: FeatureSpec,
        cfg: LoaderConfig,
        weights: Mapping[str, float],
        seed: int,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
        borrow: Optional[Mapping[str, Sequence[str]]] = None,
    ):
        self.spec, self.cfg = spec, cfg
        self.borrowing = Borrowing(spec, borrow or {})
        files = {t: shard_files(features, "train", t) for t in spec.tasks}
        self.rows = {t: count_rows(f) for t, f in files.items()}
        empty = [t for t, n in self.rows.items() if n == 0]
        if empty:
            raise ValueError(f"tasks {empty} have no train rows; check their adapters and the split")
        self.probs = mix_probabilities(self.rows, cfg, weights)
        self.names = sorted(self.probs)
        self.rng = np.random.default_rng([seed, 1, rank])
        self.device = torch.device(device) if cfg.resident else torch.device("cpu")
        self.streams = {t: self._stream(files[t], seed, spec.tasks[t].id, rank, world) for t in self.names}

    def _stream(self, files, seed: int, task_id: int, rank: int, world: int):
        if self.cfg.resident:
            from unirec.data.resident import ResidentStream

            return ResidentStream(files, seed * 1_000 + task_id, self.device, rank, world)
        rng = np.random.default_rng([seed, 2, task_id])
        return TaskStream(files, self.cfg.shuffle_buffer, rng, rank, world)

    def state(self) -> dict:
        """Position after the last batch produced: plain data (JSON-able), see :meth:`TaskStream.state`."""
        return {
            "rng": self.rng.bit_generator.state,
            "streams": {t: s.state() for t, s in self.streams.items()},
        }

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for t, s in state["streams"].items():
            self.streams[t].load_state(s)

    def next_arrays(self) -> Arrays:
        counts = self.rng.multinomial(self.cfg.batch_size, [self.probs[t] for t in self.names])
        parts = [self.streams[t].take(int(k)) for t, k in zip(self.names, counts) if k > 0]
        if self.cfg.resident:
            return {c: torch.cat([p[c] for p in parts]) for c in parts[0]}
        return concat_arrays(parts)

    def next_batch(self) -> Batch:
        """The next batch with the model's dtypes already applied (int64 ids, float masks) and any borrowed
        rows appended, so this work happens in the prefetch thread rather than in the training step."""
        return self.borrowing(to_batch(self.next_arrays(), self.spec).to(self.device))

    def batches(self, pin_memory: bool = False) -> Iterator[Tuple[Batch, dict]]:
        """Endless (batch, loader state right after it): checkpoints save the state of the last batch
        *consumed*, which with prefetching is behind the loader's own position."""

        def make():
            batch = self.next_batch()
            return (batch.pin_memory() if pin_memory and not self.cfg.resident else batch), self.state()

        if self.cfg.prefetch <= 0 or self.cfg.resident:  # resident batches need no loader thread
            while True:
                yield make()
        yield from _prefetched(make, self.cfg.prefetch)

    def __iter__(self) -> Iterator[Batch]:
        return (batch for batch, _ in self.batches())


def eval_batches(
    features: Path, spec: FeatureSpec, split: str, task: str, batch_size: int, rank: int = 0, world: int = 1
) -> Iterator[Batch]:
    """The rows of one task and split in file order (no shuffle); with several ranks, every world-th row."""
    for f in shard_files(features, split, task):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([rb])
            if world > 1:
                table = table.take(np.arange(rank, table.num_rows, world))
            yield to_batch(table_to_arrays(table), spec)


def _prefetched(make, depth: int) -> Iterator[Batch]:
    """Build batches in a background thread: Arrow and numpy release the GIL, so this overlaps compute."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work():
        try:
            while not stop.is_set():
                put(make())
        except BaseException as e:  # surfaced in the consumer, never swallowed
            put(e)

    th = threading.Thread(target=work, name="unirec-loader", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Join, not just signal: a daemon thread still inside Arrow or torch at interpreter exit aborts it.
        stop.set()
        th.join(timeout=10)


def _len(cols: Arrays) -> int:
    return len(next(iter(cols.values())))
