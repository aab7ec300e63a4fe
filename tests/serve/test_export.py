"""Export: a versioned artifact with a manifest of hashes; loading refuses anything unlisted or changed."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from unirec.export import MANIFEST, ArtifactError, export, main, sha256, verify, versions
from unirec.serve.scorer import load_artifact


def test_artifact_holds_every_part_and_the_manifest_hashes_each_file(artifact: Path):
    manifest = verify(artifact)
    files = manifest["files"]
    for part in (
        "model.safetensors",
        "model_config.json",
        "feature_spec.json",
        "popularity.parquet",
        "metrics.json",
    ):
        assert part in files
    assert (
        "candidates/item.parquet" in files
        and "candidates/genre.parquet" in files
        and "vocab/user.json" in files
    )
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {MANIFEST}
    assert on_disk == set(files)
    assert all(files[f]["sha256"] == sha256(artifact / f) for f in files)
    assert manifest["version"] == artifact.name == "v000001"
    assert manifest["tasks"] == {"genre": 3, "home": 0, "related": 1, "search": 2, "genre_rows": 4}
    assert json.loads((artifact / "model_config.json").read_text())["embedding_dim"] == 16
    assert not list(p for p in artifact.iterdir() if p.suffix in (".pt", ".pkl"))


def test_versions_increase_and_publishing_leaves_no_temporary_directory(toy_run: Path, tmp_path: Path):
    reg = tmp_path / "reg"
    assert main([str(toy_run), "--registry", str(reg)]).name == "v000001"
    assert export(toy_run, reg, "best").name == "v000002"
    assert versions(reg) == ["v000001", "v000002"]
    assert [p.name for p in reg.iterdir() if p.name.startswith(".")] == []


def test_a_failed_export_publishes_nothing(toy_run: Path, tmp_path: Path):
    with pytest.raises(ArtifactError, match="no checkpoint 'step-99999999'"):
        export(toy_run, tmp_path / "reg", "step-99999999")
    assert versions(tmp_path / "reg") == []


@pytest.fixture
def copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "v000009"))


def test_a_changed_byte_is_refused_naming_the_file(copy: Path):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors fails its sha256"):
        load_artifact(copy)


def test_a_file_missing_from_the_manifest_is_refused(copy: Path):
    (copy / "vocab" / "extra.json").write_text("[]")
    with pytest.raises(ArtifactError, match="extra.json is not in the manifest"):
        verify(copy)


class _SideEffect:
    """Unpickling this touches ``marker``: the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _list_in_manifest(art: Path, rel: str) -> None:
    m = json.loads((art / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha256(art / rel), "bytes": (art / rel).stat().st_size}
    (art / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("rel", ["model.pkl", "state.pt", "model.safetensors"])
@pytest.mark.parametrize("listed", [False, True])
def test_a_pickle_is_refused_and_never_unpickled(copy: Path, tmp_path: Path, rel: str, listed: bool):
    """Stray, listed with a correct hash, or disguised as the weights: refused, and no side effect."""
    marker = tmp_path / "pwned"
    (copy / rel).write_bytes(pickle.dumps(_SideEffect(marker)))
    if listed:
        _list_in_manifest(copy, rel)
    with pytest.raises(ArtifactError):
        load_artifact(copy)
    assert not marker.exists()


def test_unknown_model_config_key_is_refused(copy: Path):
    (copy / "model_config.json").write_text(json.dumps({"embedding_dim": 16, "_target_": "os.system"}))
    _list_in_manifest(copy, "model_config.json")
    with pytest.raises(ArtifactError, match=r"unknown model config key\(s\) \['_target_'\]"):
        load_artifact(copy)


def _edit_spec(art: Path, change) -> None:
    spec = json.loads((art / "feature_spec.json").read_text())
    change(spec)
    (art / "feature_spec.json").write_text(json.dumps(spec))
    _list_in_manifest(art, "feature_spec.json")  # a consistent forgery: the spec itself is hashed


def _vocab_at(spec: dict, where: str) -> None:
    spec["tables"]["user"]["vocab"] = where


def _candidate_named(spec: dict, name: str) -> None:
    spec["candidates"][name] = spec["candidates"].pop("genre")


@pytest.mark.parametrize(
    "change, value, key",
    [
        (_vocab_at, "{outside}/outside.json", "tables.user.vocab"),
        (_vocab_at, "../outside.json", "tables.user.vocab"),
        (_vocab_at, "vocab/unlisted.json", "tables.user.vocab"),
        (_candidate_named, "../../genre", "candidates.../../genre"),
    ],
    ids=["absolute", "dotdot", "unlisted", "candidate-name"],
)
def test_the_spec_cannot_make_loading_read_a_file_outside_the_artifact(copy: Path, change, value, key):
    """A vocabulary path or a candidate type's name outside the artifact (or not in its manifest) is refused
    naming the spec key; the outside files (a vocabulary, a catalogue) are there to be read, and are not."""
    (copy.parent / "outside.json").write_text(json.dumps(["7", "8"]))
    shutil.copyfile(copy / "candidates" / "genre.parquet", copy.parent / "genre.parquet")
    _edit_spec(copy, lambda spec: change(spec, value.format(outside=copy.parent)))
    with pytest.raises(ArtifactError, match=re.escape(key)):
        load_artifact(copy)
