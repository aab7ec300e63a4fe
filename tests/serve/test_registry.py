"""Tampered registry versions are refused with the reason on /v1/metadata; the old one keeps serving, a
refused version is retried once its files change, and start-up skips a bad newest version."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import httpx

from tests.serve.conftest import live
from unirec.export import MANIFEST, sha256

BODY = {"environment": "home", "context": {"user": "7"}, "candidates": {"ids": ["1", "2", "3"]}}


def tampered(registry: Path, version: str, change: Callable[[Path, dict], None]) -> Path:
    """A copy of v000001 published as ``version`` after ``change(staging dir, manifest)``; files the change
    rewrote are listed again under their new hash (a consistent forgery, not a corrupt copy)."""
    stage = registry / ".staging"
    shutil.copytree(registry / "v000001", stage)
    manifest = json.loads((stage / MANIFEST).read_text())
    change(stage, manifest)
    for rel, entry in manifest["files"].items():
        if isinstance(entry, dict) and (stage / rel).is_file():
            entry.update(sha256=sha256(stage / rel), bytes=(stage / rel).stat().st_size)
    (stage / MANIFEST).write_text(json.dumps(manifest))
    os.rename(stage, registry / version)
    return registry / version


def forged_version(claim: str):
    def change(stage: Path, manifest: dict) -> None:
        manifest["version"] = claim

    return change


def bad_entry(stage: Path, manifest: dict) -> None:
    manifest["files"]["metrics.json"] = "0" * 64


def bad_model_config(stage: Path, manifest: dict) -> None:
    cfg = json.loads((stage / "model_config.json").read_text())
    (stage / "model_config.json").write_text(json.dumps({**cfg, "embedding_dim": "sixteen"}))


def extra_spec_key(stage: Path, manifest: dict) -> None:
    spec = json.loads((stage / "feature_spec.json").read_text())
    field = next(iter(spec["context"]))
    spec["context"][field]["colour"] = "red"
    (stage / "feature_spec.json").write_text(json.dumps(spec))


def _wait_for(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_forged_and_malformed_versions_are_refused_with_the_reason_on_metadata(registry: Path, toy_run):
    from unirec.export import export

    with live(registry, ["serve=home", "server.freshness_s=0.1"]) as server:
        holder = server.app.state.holder
        bad = {
            "v000002": (forged_version("v999999"), "manifest names version 'v999999'"),
            "v000003": (bad_entry, "entry 'metrics.json'"),
            "v000004": (bad_model_config, "embedding_dim"),
            "v000005": (extra_spec_key, "colour"),
            "v000006": (forged_version("v000001"), "manifest names version 'v000001'"),
        }
        for version, (change, _) in bad.items():
            tampered(registry, version, change)
            _wait_for(lambda v=version: v in holder.refused)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            meta = c.get("/v1/metadata").json()
            assert c.post("/v1/rank", json=BODY).json()["model_version"] == "v000001"
        # a later good export is still adopted: no forged version blocks the ones after it
        assert export(toy_run, registry).name == "v000007"
        _wait_for(lambda: holder.version == "v000007")
    assert meta["model_version"] == "v000001"
    assert set(meta["refused_versions"]) == set(bad)
    for version, (_, why) in bad.items():
        assert why in meta["refused_versions"][version], meta["refused_versions"][version]


def test_a_process_started_with_a_bad_newest_version_serves_the_newest_good_one(registry: Path):
    shutil.copytree(registry / "v000001", registry / "v000002")
    _fix_version(registry / "v000002")
    tampered(registry, "v000003", extra_spec_key)
    with live(registry, ["serve=home", "server.freshness_s=0"]) as server:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            meta = c.get("/v1/metadata").json()
            ready = c.get("/readyz").json()
    assert ready == {"status": "ready", "model_version": "v000002"}
    assert list(meta["refused_versions"]) == ["v000003"] and "colour" in meta["refused_versions"]["v000003"]


def _fix_version(path: Path) -> None:
    m = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**m, "version": path.name}))


def test_a_version_refused_half_copied_is_adopted_once_complete(registry: Path):
    with live(registry, ["serve=home", "server.freshness_s=0.1"]) as server:
        holder = server.app.state.holder
        # what a poll sees mid-`cp -r`: the manifest and some files, the weights not yet there
        half = registry / "v000002"
        shutil.copytree(registry / "v000001", half, ignore=shutil.ignore_patterns("model.safetensors"))
        _fix_version(half)
        _wait_for(lambda: "v000002" in holder.refused)
        assert "model.safetensors" in holder.refused["v000002"]
        time.sleep(0.5)  # several polls: unchanged, it is not retried (refused once, logged once)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert 'unirec_artifact_refused_total{version="v000002"} 1.0' in c.get("/metrics").text
        assert holder.version == "v000001"
        shutil.copyfile(registry / "v000001" / "model.safetensors", half / "model.safetensors")
        _wait_for(lambda: holder.version == "v000002")
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.post("/v1/rank", json=BODY).json()["model_version"] == "v000002"
            assert c.get("/v1/metadata").json()["refused_versions"] == {}
