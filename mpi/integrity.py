"""What a finished stage's done.json vouches for: the size and sha256 of every file in its folder.

A run folder lives for days on a laptop disk or on Google Drive, where a partial sync or a full disk can leave
a finished stage with a truncated adapter. `mpi.pipeline` records `file_manifest(folder)` in each stage's
done.json when the stage finishes and, before it skips the stage on a rerun, checks the folder against it
(`damage`): a missing or changed file makes the stage be rebuilt, with the folder and the file named,
instead of a raw SafetensorError when the next stage loads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

DONE = "done.json"
MANIFEST_KEY = "files"  # done.json's key: {relative path: {"size": bytes, "sha256": hex}}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """The stage's files: everything under `folder` but its done.json and hidden temporaries (.name.tmp)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != DONE and not any(part.startswith(".") for part in rel.parts):
            out.append(path)
    return out


def file_manifest(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file of a finished stage folder (done.json excluded)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _files(folder)}


def damage(folder: str | Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between `folder` and the manifest its done.json recorded: one line per missing, resized or
    changed file (empty: intact). Files added since are not damage (a report may write next to them)."""
    folder = Path(folder)
    problems = []
    for rel, want in manifest.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel} has {size:,} bytes, done.json recorded {want['size']:,}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} has changed (sha256 differs from done.json's)")
    return problems


def stage_damage(folder: str | Path) -> list[str]:
    """Why a folder with a done.json is not an intact finished stage ([] if it is, or if its done.json predates
    manifests: nothing to check against)."""
    import json

    folder = Path(folder)
    try:
        done = json.loads((folder / DONE).read_text())
    except (OSError, ValueError) as err:
        return [f"{DONE} is unreadable ({type(err).__name__}: {err})"]
    if not isinstance(done, dict):
        return [f"{DONE} is not a JSON object"]
    manifest = done.get(MANIFEST_KEY)
    return damage(folder, manifest) if isinstance(manifest, dict) else []
