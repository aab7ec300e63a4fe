"""Checkpoints written atomically and read without unpickling code.

A checkpoint is a directory ``step-<N>/`` holding ``model.safetensors`` and ``state.pt`` (optimizer and
scheduler state: tensors and plain containers only, loaded with ``weights_only=True``). It is written under
a temporary name, fsynced and renamed; only then does ``latest`` point at it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def save(directory: Path, step: int, model: torch.nn.Module, extra: Dict[str, Any], keep: int = 2) -> Path:
    """Write ``directory/step-<step>`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    torch.save(extra, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(directory)
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, directory / LATEST)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load(path: Path, model: torch.nn.Module) -> Dict[str, Any]:
    """Load weights into ``model`` and return the extra state (tensors and plain data only)."""
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return torch.load(Path(path) / "state.pt", weights_only=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
