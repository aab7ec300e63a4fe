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


def load_script(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package), loaded once per session."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses in the script look their module up here
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def toy_cfg(tmp_path_factory) -> Config:
    cache = tmp_path_factory.mktemp("cache")
    return compose(["debug=toy", f"data.cache_dir={cache}"])


@pytest.fixture(scope="session")
def toy_features(toy_cfg) -> Path:
    from unirec.data.prepare import prepare

    return prepare(toy_cfg.data, toy_cfg.task, toy_cfg.seed)
