"""Shared fixtures: configs composed from the real conf/ tree, and one toy prepared data set per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from unirec.config import Config, compose

ROOT = Path(__file__).resolve().parents[1]


def run_train(args: List[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m unirec.train`` in a real subprocess, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "unirec.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def toy_cfg(tmp_path_factory) -> Config:
    cache = tmp_path_factory.mktemp("cache")
    return compose(["debug=toy", f"data.cache_dir={cache}"])


@pytest.fixture(scope="session")
def toy_features(toy_cfg) -> Path:
    from unirec.data.prepare import prepare

    return prepare(toy_cfg.data, toy_cfg.task, toy_cfg.seed)
