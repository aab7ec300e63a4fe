"""Fetch MovieLens-100K into a directory, verified by sha256.

    python scripts/fetch_movielens.py data/ml-100k            # then: data=movielens data.raw_dir=data/ml-100k
    python scripts/fetch_movielens.py data/ml-100k --source recbole

Sources, tried in order (``--source`` picks one):

1. ``grouplens``: the archive https://files.grouplens.org/datasets/movielens/ml-100k.zip (short timeout);
   the archive's sha256 is checked, then ``u.data``, ``u.user``, ``u.item`` (and the rest of ``ml-100k/``)
   are extracted.
2. ``recbole``: ``pip download --no-deps recbole==1.2.1`` (the PyPI wheel ships MovieLens-100K as RecBole
   atomic files); the wheel's ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`` are extracted
   and each file's sha256 is checked.

Either way the directory then loads with :func:`unirec.data.movielens.load`; the script prints the tables'
sizes and writes ``SOURCE.json`` (source, URL, checksums) beside the files. An existing verified copy is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# Not observed here (files.grouplens.org was unreachable): the published MD5 is
# 0e33842e24a9c977be4e0107933c0723, size 4,924,029 bytes; this sha256 is the value other projects record for it.
GROUPLENS_ZIP_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
GROUPLENS_FILES = ("u.data", "u.user", "u.item")

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
# Observed here in recbole-1.2.1-py3-none-any.whl from PyPI (the wheel, then the three files in it).
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_grouplens(out: Path, timeout: float) -> dict:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as resp:
        blob = resp.read()
    digest = sha256(blob)
    if digest != GROUPLENS_ZIP_SHA256:
        raise ValueError(f"{GROUPLENS_URL}: sha256 {digest}, expected {GROUPLENS_ZIP_SHA256}")
    files = {}
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if base and not name.endswith("/"):
                data = z.read(name)
                (out / base).write_bytes(data)
                files[base] = sha256(data)
    missing = [f for f in GROUPLENS_FILES if f not in files]
    if missing:
        raise ValueError(f"the archive lacks {missing}")
    return {"source": "grouplens", "url": GROUPLENS_URL, "archive_sha256": digest, "files": files}


def fetch_recbole(out: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", RECBOLE_REQUIREMENT, "-d", tmp, "-q"]
        subprocess.run(cmd, check=True, timeout=max(timeout, 300))
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        wheel_digest = sha256(wheel.read_bytes())
        if wheel_digest != RECBOLE_WHEEL_SHA256:
            raise ValueError(f"{wheel.name}: sha256 {wheel_digest}, expected {RECBOLE_WHEEL_SHA256}")
        files = {}
        with zipfile.ZipFile(wheel) as z:
            for base, expected in RECBOLE_SHA256.items():
                data = z.read(RECBOLE_PREFIX + base)
                digest = sha256(data)
                if digest != expected:
                    raise ValueError(
                        f"{wheel.name}:{RECBOLE_PREFIX}{base}: sha256 {digest}, expected {expected}"
                    )
                files[base] = digest
            for base in files:
                (out / base).write_bytes(z.read(RECBOLE_PREFIX + base))
        return {"source": "recbole", "wheel": wheel.name, "wheel_sha256": wheel_digest, "files": files}


def verified(out: Path) -> dict | None:
    """The SOURCE.json of a complete copy whose files still match their recorded checksums."""
    meta = out / "SOURCE.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    expected = RECBOLE_SHA256 if info.get("source") == "recbole" else info.get("files", {})
    wanted = GROUPLENS_FILES if info.get("source") == "grouplens" else tuple(RECBOLE_SHA256)
    ok = all(
        (out / f).is_file() and f in expected and sha256((out / f).read_bytes()) == expected[f]
        for f in wanted
    )
    return info if ok else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to fetch into")
    ap.add_argument("--source", choices=("auto", "grouplens", "recbole"), default="auto")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds for the GroupLens host")
    ap.add_argument("--force", action="store_true", help="fetch again even if a verified copy exists")
    args = ap.parse_args(argv)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    info = None if args.force else verified(out)
    if info:
        print(f"kept the verified copy in {out} (source: {info['source']})")
    else:
        sources = ("grouplens", "recbole") if args.source == "auto" else (args.source,)
        for src in sources:
            try:
                info = (fetch_grouplens if src == "grouplens" else fetch_recbole)(out, args.timeout)
                break
            except Exception as e:  # noqa: BLE001 - report and try the next source
                print(f"{src}: not fetched ({type(e).__name__}: {e})", file=sys.stderr)
        if info is None:
            print("no source could be fetched", file=sys.stderr)
            return 1
        (out / "SOURCE.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        print(f"fetched MovieLens-100K from {info['source']} into {out}")
    for f, d in sorted(info["files"].items()):
        if f in GROUPLENS_FILES or f in RECBOLE_SHA256:
            print(f"  sha256 {d}  {f}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from unirec.data.movielens import load

    ml = load(out)
    print(
        f"loaded: {ml.ratings.num_rows:,} ratings, {ml.users.num_rows:,} users, {ml.items.num_rows:,} items"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
