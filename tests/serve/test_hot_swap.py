"""New versions are picked up under load with zero failed requests; corrupt ones are refused, the old serves on."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.serve.conftest import live
from unirec.export import export, sha256

BODY = {"environment": "home", "context": {"user": "7"}, "candidates": {"ids": ["1", "2", "3"]}}


class Load:
    """Two client threads sending requests until stopped; every answer's status and version recorded."""

    def __init__(self, url: str):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                # A generous timeout: on 2 shared cores the new version's warm-up can slow a request past
                # the environment's 80 ms, and this test is about the swap, not about latency.
                body = {**BODY, "context": {"user": str(i * 1000 + n % 50)}, "timeout_ms": 5000}
                r = c.post("/v1/rank", json=body)
                self.results.append((r.status_code, r.json().get("model_version"), r.json().get("degraded")))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _wait_for(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_new_version_under_load_is_picked_up_with_zero_failed_requests(registry: Path, toy_run: Path):
    with live(registry, ["serve=home", "server.freshness_s=0.2"]) as server, Load(server.url) as load:
        _wait_for(lambda: len(load.results) > 20)
        assert export(toy_run, registry, "best").name == "v000002"
        _wait_for(lambda: server.app.state.holder.version == "v000002")
        n = len(load.results)
        _wait_for(lambda: len(load.results) > n + 20)
    statuses = {s for s, _, _ in load.results}
    assert statuses == {200}
    assert all(d["degraded"] is False for _, _, d in load.results), [
        d for _, _, d in load.results if d["degraded"]
    ][:3]
    seen = [v for _, v, _ in load.results]
    assert seen[0] == "v000001" and seen[-1] == "v000002"


def _corrupt_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst.parent / ".staging")
    data = bytearray((dst.parent / ".staging" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst.parent / ".staging" / "model.safetensors").write_bytes(bytes(data))
    os.rename(dst.parent / ".staging", dst)


def _pickled_copy(src: Path, dst: Path, marker: Path) -> None:
    """A copy with a side-effecting pickle listed in the manifest under a correct hash."""
    shutil.copytree(src, dst.parent / ".staging")
    stage = dst.parent / ".staging"
    (stage / "extra.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    m = json.loads((stage / "manifest.json").read_text())
    m["files"]["extra.pkl"] = {"sha256": sha256(stage / "extra.pkl"), "bytes": 1}
    (stage / "manifest.json").write_text(json.dumps(m))
    os.rename(stage, dst)


class _Touch:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_corrupt_and_pickled_versions_are_refused_and_the_old_one_keeps_serving(
    registry: Path, tmp_path: Path
):
    marker = tmp_path / "pwned"
    with live(registry, ["serve=home", "server.freshness_s=0.1"]) as server, Load(server.url) as load:
        holder = server.app.state.holder
        _corrupt_copy(registry / "v000001", registry / "v000002")
        _wait_for(lambda: "v000002" in holder.refused)
        _pickled_copy(registry / "v000001", registry / "v000003", marker)
        _wait_for(lambda: "v000003" in holder.refused)
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/readyz").json() == {"status": "ready", "model_version": "v000001"}
            metrics = c.get("/metrics").text
            meta = c.get("/v1/metadata").json()
    assert "sha256" in holder.refused["v000002"] and "extra.pkl" in holder.refused["v000003"]
    assert set(meta["refused_versions"]) == {"v000002", "v000003"}
    assert 'unirec_artifact_refused_total{version="v000002"} 1.0' in metrics
    assert {s for s, _, _ in load.results} == {200} and {v for _, v, _ in load.results} == {"v000001"}
    assert not marker.exists()


def test_python_m_unirec_serve_starts_one_environment(registry: Path, tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "unirec.serve",
        "serve=related",
        f"server.registry={registry}",
        f"server.port={port}",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _ready(url) or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        r = httpx.post(
            f"{url}/v1/rank", json={"context": {"source_item": "4"}, "candidates": {"ids": ["1", "2"]}}
        )
        assert r.status_code == 200 and r.json()["environment"] == "related"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "outputs").exists()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
