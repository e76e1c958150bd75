"""manifest.json: the record that makes a stage done, and the next stage's input.

Written last and atomically (tmp file, fsync, rename) by rank 0 once the
DeepSpeed checkpoint and the Hugging Face model are on disk. A stage without
a valid manifest (present, parseable, every listed file with its checksum)
is not done. No torch: the orchestrator reads manifests too.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "stage",
    "phase",
    "kind",
    "zero_stage",
    "world_size",
    "dtype",
    "optimizer",
    "global_step_start",
    "global_step_end",
    "stage_steps",
    "tokens_seen",
    "samples_seen",
    "data_position",
    "eval",
    "load",
    "checkpoint_tag",
    "files",
    "weights_digest",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write text so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class InvalidManifest(Exception):
    pass


def read_manifest(path: Path, verify_files: bool = True) -> dict[str, Any]:
    """The manifest at path, checked: required keys present and, if asked, every
    listed file present with its checksum. Raises InvalidManifest saying why."""
    if not path.is_file():
        raise InvalidManifest(f"{path} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidManifest(f"{path} is not valid JSON: {error}") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InvalidManifest(f"{path} lacks {missing}")
    if manifest["format"] != FORMAT_VERSION:
        raise InvalidManifest(f"{path} has format {manifest['format']}, expected {FORMAT_VERSION}")
    if verify_files:
        for rel, expected in manifest["files"].items():
            file = path.parent / rel
            if not file.is_file():
                raise InvalidManifest(f"{file} listed in {path} is missing")
            if sha256_file(file) != expected:
                raise InvalidManifest(f"{file} does not match its checksum in {path}")
    return manifest


def valid_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest if valid, else None."""
    try:
        return read_manifest(path)
    except InvalidManifest:
        return None


def manifest_written(path: Path) -> bool:
    """A complete manifest exists (without re-hashing the files it lists: cheap)."""
    try:
        read_manifest(path, verify_files=False)
    except InvalidManifest:
        return False
    return True
