"""Checkpoints written atomically and read without unpickling code.

A checkpoint is a directory ``step-<N>/`` holding

    model.safetensors   the weights
    state.pt            optimizer, scheduler and torch RNG state: tensors and plain containers only,
                        loaded with ``weights_only=True``
    trainer.json        step, loader positions (one per rank), counters, metrics: plain JSON

It is written under a temporary name, every file fsynced, then renamed; only then does the ``latest``
pointer move to it (itself written by rename), and only then are old checkpoints pruned. A process killed
at any moment leaves ``latest`` on a complete checkpoint. Non-finite weights are never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest"
BEST = "best"
# Fault injection for tests: seconds to pause between writing a checkpoint's files.
_DELAY_ENV = "UNIREC_CHECKPOINT_DELAY_S"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


def save(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    state: Dict[str, Any],
    trainer: Dict[str, Any],
    keep: int = 2,
    best: bool = False,
    best_of: Sequence[str] = (),
) -> Path:
    """Write ``directory/step-<step>`` atomically, point ``latest`` (and ``best`` if it is the best so far,
    ``best-<task>`` for each task in ``best_of`` it is best for) at it, then prune to the newest ``keep``
    plus every pointed-at checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write step {step}: non-finite values in {bad[:5]}")
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    delay = float(os.environ.get(_DELAY_ENV, "0"))
    save_file(weights, str(tmp / "model.safetensors"))
    time.sleep(delay)
    torch.save(state, tmp / "state.pt")
    time.sleep(delay)
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step}))
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(directory)
    _point(directory, LATEST, final.name)
    if best:
        _point(directory, BEST, final.name)
    for task in best_of:
        _point(directory, best_pointer(task), final.name)
    _prune(directory, keep, step)
    return final


def best_pointer(task: str) -> str:
    """The pointer file naming the checkpoint best for ``task`` (``--checkpoint best:<task>``)."""
    return f"{BEST}-{task}"


def latest(directory: Path) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "trainer.json").exists():
        raise CheckpointError(f"{pointer} points at {path.name}, which is incomplete or missing")
    return path


# What resuming reads from each file; a file without it is as broken as a truncated one.
_STATE_KEYS = ("optimizers", "schedulers", "torch_rng")
_TRAINER_KEYS = ("step", "loader", "progress")


def load(path: Path, model: torch.nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Load weights into ``model``; return (state.pt contents, trainer.json contents).

    Every file is read and checked for what resuming needs before anything else; a failure is a
    CheckpointError naming the file (a truncated safetensors, an empty trainer.json, a missing key).
    """
    path = Path(path)
    trainer = _read(path / "trainer.json", lambda f: json.loads(f.read_text()), _TRAINER_KEYS)
    state = _read(path / "state.pt", lambda f: torch.load(f, weights_only=True), _STATE_KEYS)
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f)), ())
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: {e}") from e
    return state, trainer


def _read(file: Path, read: Callable[[Path], Any], keys: Tuple[str, ...]) -> Any:
    try:
        out = read(file)
    except (OSError, RuntimeError, ValueError, SafetensorError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint file {file}: {e}") from e
    missing = [k for k in keys if not isinstance(out, dict) or k not in out]
    if missing:
        raise CheckpointError(f"checkpoint file {file} lacks {missing}: it is incomplete or not a checkpoint")
    return out


def resumable(directory: Path) -> List[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` points at, then the older ones, newest
    first. Steps after ``latest`` are left by a run resumed from an older checkpoint: never resumed."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return []
    named = Path(directory) / pointer.read_text().strip()
    upto = _step(named.name)
    if upto is None:
        raise CheckpointError(f"{pointer} names {named.name!r}, which is not a checkpoint (step-<N>)")
    steps = {p: _step(p.name) for p in Path(directory).glob("step-*")}
    older = [p for p, n in steps.items() if n is not None and n < upto]
    return [named, *sorted(older, key=steps.get, reverse=True)]


def load_newest_intact(
    directory: Path, model: torch.nn.Module, warn: Callable[[str], None]
) -> Optional[Tuple[Path, Dict[str, Any], Dict[str, Any]]]:
    """(path, state, trainer) of the newest checkpoint that loads, ``warn``-ing about each broken one on the
    way; None when there is none to resume; CheckpointError naming every one when all are broken."""
    broken = []
    for path in resumable(directory):
        try:
            return (path, *load(path, model))
        except CheckpointError as e:
            broken.append(str(e))
            warn(f"checkpoint {path} is broken, falling back to the previous one: {e}")
    if broken:
        raise CheckpointError(f"no intact checkpoint in {directory} to resume from: " + "; ".join(broken))
    return None


def _step(name: str) -> Optional[int]:
    head, _, number = name.partition("-")
    return int(number) if head == "step" and number.isdigit() else None


def clean_partial(directory: Path) -> int:
    """Remove temporary directories left by a process killed mid-write; returns how many."""
    stale = list(Path(directory).glob(".tmp-*")) if Path(directory).exists() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def _point(directory: Path, name: str, target: str) -> None:
    tmp = directory / f".{name}.tmp"
    tmp.write_text(target)
    fsync(tmp)
    os.replace(tmp, directory / name)
    fsync(directory)


def _prune(directory: Path, keep: int, step: int) -> None:
    """Keep the newest ``keep`` up to ``step`` plus ``latest``, ``best`` and every ``best-<task>``; never touch later steps (left by
    a run resumed from an older checkpoint, they are pruned as this run passes them)."""
    pointers = [directory / LATEST, directory / BEST, *directory.glob(f"{BEST}-*")]
    protected = {p.read_text().strip() for p in pointers if p.is_file()}
    upto = [p for p in sorted(directory.glob("step-*")) if int(p.name.split("-")[1]) <= step]
    for old in upto[: max(len(upto) - max(keep, 1), 0)]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file or directory to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
