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
from typing import Any, Dict, Optional, Tuple

import torch
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
) -> Path:
    """Write ``directory/step-<step>`` atomically, point ``latest`` (and ``best`` if it is the best so far)
    at it, then prune to the newest ``keep`` plus the best."""
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
    _prune(directory, keep, step)
    return final


def latest(directory: Path) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None when there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "trainer.json").exists():
        raise CheckpointError(f"{pointer} points at {path.name}, which is incomplete or missing")
    return path


def load(path: Path, model: torch.nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Load weights into ``model``; return (state.pt contents, trainer.json contents)."""
    path = Path(path)
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        state = torch.load(path / "state.pt", weights_only=True)
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    return state, trainer


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
    """Keep the newest ``keep`` up to ``step`` plus ``latest`` and ``best``; never touch later steps (left by
    a run resumed from an older checkpoint, they are pruned as this run passes them)."""
    protected = {(directory / p).read_text().strip() for p in (LATEST, BEST) if (directory / p).exists()}
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
