"""Serving fixtures: one trained toy run and one exported version per session; live servers on loopback."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from tests.conftest import run_train
from unirec.export import export
from unirec.serve.config import ServeConfig, compose_serve


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory, toy_cfg, toy_features) -> Path:
    """A trained toy run (about 10 s), on the session's prepared toy data."""
    run = tmp_path_factory.mktemp("serve-run")
    r = run_train(["debug=toy", f"data.cache_dir={toy_cfg.data.cache_dir}", f"hydra.run.dir={run}"], cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, toy_run) -> Path:
    """The toy run exported once: ``<registry>/v000001`` (read-only for tests: copy it to change it)."""
    return export(toy_run, tmp_path_factory.mktemp("registry-session"))


@pytest.fixture
def registry(tmp_path, artifact) -> Path:
    """A registry of this test's own holding a copy of the session's v000001."""
    reg = tmp_path / "registry"
    shutil.copytree(artifact, reg / "v000001")
    return reg


def serve_config(registry: Path, overrides: Sequence[str] = ()) -> ServeConfig:
    """The real composed config (conf/serve.yaml + groups), pointed at ``registry``."""
    return compose_serve([f"server.registry={registry}", *overrides])


class LiveServer:
    """uvicorn serving ``app`` on a loopback socket in a thread; ``url`` is its base address."""

    def __init__(self, app, options: Optional[dict] = None):
        import uvicorn

        self.app = app
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
        # it h11's separate header and body writes meet the 40 ms delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        options = {"log_level": "warning", "access_log": False, **(options or {})}
        config = uvicorn.Config(app, lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@contextmanager
def live(registry: Path, overrides: Sequence[str] = ()) -> Iterator[LiveServer]:
    """A live server for ``registry`` with the given config overrides, run with the options (protocols,
    connection limits) that ``python -m unirec.serve`` gives uvicorn."""
    from unirec.serve.__main__ import uvicorn_options
    from unirec.serve.app import create_app

    cfg = serve_config(registry, overrides)
    with LiveServer(create_app(cfg), uvicorn_options(cfg.server)) as server:
        yield server


class Wrapped:
    """A scorer stand-in: the real one, with ``score`` replaced (slow, failing, NaN) for fault tests."""

    def __init__(self, real, score):
        self._real, self.score = real, score

    def __getattr__(self, name):
        return getattr(self._real, name)


def assert_scores_match_forward(scorer, features: Path, task: str, requests: int) -> int:
    """Raw valid rows of ``task``, one request at a time through the scorer, against MultiTaskRanker's
    forward on the same rows' shard (atol 1e-5); returns how many (request, candidate) rows were checked."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from unirec.data.batch import table_to_arrays, to_batch

    shard = pq.read_table(features / "valid" / task / "part-00000.parquet")
    raw = pq.read_table(features.parent / "labeled" / "split=valid" / f"task={task}" / "part-00000.parquet")
    assert shard["request_id"].equals(raw["request_id"])  # the shard rows are the raw rows, in order
    with torch.inference_mode():
        expected = torch.sigmoid(
            scorer.model(to_batch(table_to_arrays(shard), scorer.spec).to("cpu")).double()
        )
    request = raw["request_id"].to_numpy()
    checked = 0
    for rid in np.unique(request)[:requests]:
        rows = np.nonzero(request == rid)[0]
        context = {f: raw[f][int(rows[0])].as_py() for f in scorer.spec.context}
        got = scorer.score(task, context, raw["candidate"].take(pa.array(rows)).to_pylist())
        np.testing.assert_allclose(got, expected.numpy()[rows], rtol=0, atol=1e-5)
        checked += len(rows)
    return checked
