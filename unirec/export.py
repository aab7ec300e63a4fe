"""``python -m unirec.export``: a training run -> a versioned, verifiable artifact in a model registry.

An artifact is data only, one directory per version under the registry (``<registry>/v000001``)::

    manifest.json        format, version, source run and checkpoint, tasks, sha256 and size of every other file
    model.safetensors    the weights
    model_config.json    the ModelConfig fields (input sizes come from feature_spec.json)
    feature_spec.json    fields, sizes, sentinels, vocabulary paths, the task registry (name -> task_type id)
    vocab/<field>.json   vocabularies
    candidates/<type>.parquet, popularity.parquet
    metrics.json         the run's validation metrics

Publishing is atomic: every file is written into a temporary directory inside the registry, fsynced, and the
directory is renamed to its version name, so a reader never sees half a version. :func:`verify` is the only
way in: it refuses a file the manifest does not list, a file that fails its hash, a link, or a suffix other
than ``.json``/``.safetensors``/``.parquet`` (a stray pickle is refused by name before anything reads it).

Examples::

    python -m unirec.export runs/2026-01-01/12-00-00 --registry models/
    python -m unirec.export runs/exp --registry models/ --checkpoint best
    python -m unirec.export runs/exp --registry models/ --checkpoint best:search   # search's own best step
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import typing
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from unirec import checkpoint
from unirec.config import ModelConfig
from unirec.data.features import feature_files
from unirec.data.history import SNAPSHOT
from unirec.schema import FeatureSpec, SchemaError

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
SPEC = "feature_spec.json"
POPULARITY = "popularity.parquet"
METRICS = "metrics.json"
REQUIRED = (WEIGHTS, MODEL_CONFIG, SPEC, POPULARITY, METRICS)
# Every format that can carry code (pickle, .pt, .npy with objects) is outside this list.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".parquet")
_VERSION = re.compile(r"^v(\d{6})$")


class ArtifactError(ValueError):
    """An artifact cannot be written, or is refused on reading (the message names the file)."""


def export(run_dir: Path, registry: Path, which: str = "latest") -> Path:
    """Publish the run's checkpoint ``which`` (latest, best, best:<task> or a ``step-N`` directory) as the
    next version.

    The weights are loaded into a freshly built model before publishing, so a published version always loads.
    """
    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir, which)
    metrics = read_json(run_dir / METRICS)
    if "features" not in metrics:
        raise ArtifactError(f"{run_dir / METRICS} has no 'features' key naming the features directory")
    features = Path(metrics["features"])
    spec = FeatureSpec.load(features / SPEC)
    model_cfg = model_config_from_run(run_dir)
    _check_loads(spec, model_cfg, ckpt / WEIGHTS)
    files: Dict[str, Union[Path, bytes]] = {
        WEIGHTS: ckpt / WEIGHTS,
        MODEL_CONFIG: _json_bytes(dataclasses.asdict(model_cfg)),
        SPEC: features / SPEC,
        POPULARITY: features / POPULARITY,
        METRICS: run_dir / METRICS,
    }
    files.update({rel: features / rel for rel in feature_files(spec).values()})
    if (features / SNAPSHOT).exists():  # the users' histories, for environments with history: snapshot
        files[SNAPSHOT] = features / SNAPSHOT
    step = read_json(ckpt / "trainer.json").get("step")
    source = {"run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "step": step}
    tasks = {name: t.id for name, t in spec.tasks.items()}
    return publish(files, Path(registry), {"source": source, "tasks": tasks})


def publish(files: Mapping[str, Union[Path, bytes]], registry: Path, meta: Mapping[str, object]) -> Path:
    """Write ``files`` (artifact path -> source file or bytes) and their manifest as the next version."""
    registry.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=registry))
    try:
        entries = {}
        for rel, src in sorted(files.items()):
            _check_name(rel, tmp)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copyfile(src, dst)
            entries[rel] = {"sha256": sha256(dst), "bytes": dst.stat().st_size}
        return _rename_into_place(tmp, registry, entries, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, registry: Path, entries: Dict, meta: Mapping[str, object]) -> Path:
    """Claim the next free version name by rename; a concurrent exporter that wins makes us take the next."""
    for _ in range(100):
        version = _next_version(registry)
        manifest = {
            "format": FORMAT,
            "version": version,
            "created_unix": time.time(),
            **meta,
            "files": entries,
        }
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
            checkpoint.fsync(path)
        checkpoint.fsync(tmp)
        final = registry / version
        try:
            os.rename(tmp, final)  # fails when another exporter published this version first
        except OSError:
            continue
        checkpoint.fsync(registry)
        return final
    raise ArtifactError(f"could not claim a version name in {registry} after 100 tries")


def versions(registry: Path) -> List[str]:
    """Published version names in the registry, oldest first (temporary directories are not versions)."""
    if not Path(registry).is_dir():
        return []
    return sorted(p.name for p in Path(registry).iterdir() if _VERSION.match(p.name) and p.is_dir())


def verify(path: Path) -> Dict:
    """Check an artifact before anything reads it; returns its manifest.

    Refuses (ArtifactError naming the file): a missing or unreadable manifest, one whose ``version`` is not a
    version name or whose entries are not ``{"sha256": hex, "bytes": n}``, a file the manifest does not list,
    a listed file that is missing, has another size or fails its sha256, a link, a suffix outside
    ALLOWED_SUFFIXES, a feature spec that does not load, or one that names a file (vocabulary, candidate
    table) the manifest does not list.
    """
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
    version = manifest.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ArtifactError(f"{path / MANIFEST}: version {version!r} is not a version name like v000001")
    listed: Dict[str, Dict] = manifest["files"]
    for rel, entry in listed.items():
        if not _is_entry(entry):
            raise ArtifactError(
                f"{path / MANIFEST}: entry {rel!r} is {entry!r}, expected {{'sha256': hex, 'bytes': size}}"
            )
    for rel in _files_on_disk(path):
        if rel != MANIFEST and rel not in listed:
            raise ArtifactError(f"{path / rel} is not in the manifest; refusing artifact {path.name}")
    for rel in REQUIRED:
        if rel not in listed:
            raise ArtifactError(f"{path / MANIFEST} does not list the required file {rel}")
    for rel, entry in sorted(listed.items()):
        _check_name(rel, path)
        f = path / rel
        if f.is_symlink() or not f.is_file():
            raise ArtifactError(f"{f} is listed in the manifest but missing (or not a plain file)")
        if f.stat().st_size != entry["bytes"]:
            raise ArtifactError(
                f"{f} has {f.stat().st_size} bytes, the manifest lists {entry['bytes']}: incomplete or changed"
            )
        if sha256(f) != entry["sha256"]:
            raise ArtifactError(f"{f} fails its sha256 check; the artifact is corrupt or was changed")
    _check_spec_files(path, listed)
    return manifest


def _check_spec_files(path: Path, listed: Mapping[str, Dict]) -> None:
    """Every file the (hashed) spec makes loading read is one of the artifact's listed files: a vocabulary
    path or a candidate type's name must not reach a file outside the artifact, hashed or not."""
    try:
        files = feature_files(FeatureSpec.load(path / SPEC))
    except SchemaError as e:
        raise ArtifactError(str(e)) from e
    for key, rel in sorted(files.items()):
        if rel not in listed:
            raise ArtifactError(
                f"{path / SPEC}: {key} names {rel!r}, which is not a file of the artifact's manifest"
            )


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("bytes"), int)
        and not isinstance(entry.get("bytes"), bool)
    )


def model_config_from_run(run_dir: Path) -> ModelConfig:
    """The ModelConfig of a training run, from the composed ``config.yaml`` it wrote."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ArtifactError(f"{path} is missing: is {run_dir} a training run directory?")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return model_config_from_dict(raw.get("model") or {}, f"{path}: model")


def model_config_from_dict(raw: Mapping[str, object], where: str) -> ModelConfig:
    """Build ModelConfig from plain values, naming any key it does not know or whose value has the wrong
    type (never a class from the file)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactError(f"{where}: unknown model config key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in raw.items():
        if not _fits(hints[key], value):
            raise ArtifactError(
                f"{where}: {key}={value!r} is not a {getattr(hints[key], '__name__', hints[key])}"
            )
    return ModelConfig(**raw)


def _fits(hint: object, value: object) -> bool:
    """Whether a JSON value can stand for a field of this type (types other than these pass unchecked)."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or value in set(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (int, str, bool):
        return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    return True


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(run_dir: Path, which: str) -> Path:
    ckpts = run_dir / "checkpoints"
    if which == "latest":
        path = checkpoint.latest(ckpts)
    elif which == "best" or which.startswith("best:"):
        task = which.partition(":")[2]
        pointer = ckpts / (checkpoint.best_pointer(task) if task else checkpoint.BEST)
        path = ckpts / pointer.read_text().strip() if pointer.exists() else None
    else:
        path = Path(which) if Path(which).is_absolute() else ckpts / which
    if path is None or not (path / WEIGHTS).exists():
        known = sorted(p.name.replace(f"{checkpoint.BEST}-", f"{checkpoint.BEST}:", 1)
                       for p in ckpts.glob(f"{checkpoint.BEST}-*"))  # fmt: skip
        raise ArtifactError(
            f"no checkpoint {which!r} with {WEIGHTS} under {ckpts}; use latest, best, step-N"
            + (f" or one of {known}" if known else "")
        )
    return path


def _check_loads(spec: FeatureSpec, cfg: ModelConfig, weights: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from unirec.model import MultiTaskRanker

    state = load_file(str(weights))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ArtifactError(f"{weights}: non-finite values in {bad[:5]}; refusing to export")
    try:
        MultiTaskRanker(spec, cfg).load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(
            f"{weights} does not fit the model built from feature_spec and config: {e}"
        ) from e


def _files_on_disk(path: Path) -> List[str]:
    """Every entry under ``path`` that is not a directory (links included, never followed)."""
    out = []
    for root, dirs, names in os.walk(path, followlinks=False):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                names.append(d)
        out += [Path(root, n).relative_to(path).as_posix() for n in names]
    return sorted(out)


def _check_name(rel: str, root: Path) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise ArtifactError(f"{root}: file name {rel!r} must be a relative path inside the artifact")
    if p.suffix not in ALLOWED_SUFFIXES:
        raise ArtifactError(
            f"{root / rel}: suffix {p.suffix!r} is not allowed in an artifact {ALLOWED_SUFFIXES}"
        )


def _next_version(registry: Path) -> str:
    existing = [int(_VERSION.match(v).group(1)) for v in versions(registry)]
    return f"v{max(existing, default=0) + 1:06d}"


def read_json(path: Path) -> Dict:
    """A JSON object from ``path``; anything unreadable or not an object is an ArtifactError naming the file."""
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    if not isinstance(out, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return out


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """A plain argparse CLI: export has no config group to compose, only a run and a destination."""
    p = argparse.ArgumentParser(prog="python -m unirec.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="training run directory (holds checkpoints/, config.yaml)")
    p.add_argument("--registry", type=Path, required=True, help="model registry directory")
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="latest, best (by trainer.best_metric), best:<task> (the step best for one task), or step-N",
    )
    args = p.parse_args(argv)
    path = export(args.run_dir, args.registry, args.checkpoint)
    print(f"published {path}")
    return path


if __name__ == "__main__":
    main()
