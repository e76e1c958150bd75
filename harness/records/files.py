"""How records are written and read: atomically (tmp file, fsync, rename: a reader sees the old
file or the whole new one), as typed models (a file that does not parse into its model is
reported with its path, never half-used), with file checksums (size and xxh3) that say whether
what a record lists is still there, whole and unchanged."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import xxhash
from pydantic import BaseModel, ConfigDict, ValidationError

class InvalidRecord(Exception):
    """A record file that is missing, unparseable, or whose listed files do not match."""


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write text so that readers see the old file or the whole new one, never a part. The file
    is created with `mode` (0o600: never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its own mode: start afresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """Base of every record: unknown keys are errors (a record from another version is not guessed at)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def write(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2, by_alias=True) + "\n")

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """The record in `path`; raises InvalidRecord naming the file and what is wrong."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise InvalidRecord(f"{path} does not exist") from None
        except OSError as error:
            raise InvalidRecord(f"{path} cannot be read: {error}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<file>"
            raise InvalidRecord(f"{path} is not a valid {cls.__name__} ({where}: {first['msg']})") from None




class FileCheck(Record):
    """Size and xxh3-128 of one file: fast enough to check multi-GB checkpoints on every resume."""

    bytes: int
    xxh3: str


def file_check(path: Path) -> FileCheck:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return FileCheck(bytes=path.stat().st_size, xxh3=digest.hexdigest())


def folder_checks(folder: Path, root: Path, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, FileCheck]:
    """Every file under `folder` (whose name is `wanted`), by its path relative to `root`."""
    return {str(p.relative_to(root)): file_check(p) for p in sorted(folder.rglob("*")) if p.is_file() and wanted(p.name)}


def damaged_files(files: dict[str, FileCheck], root: Path) -> list[str]:
    """'<file>: why' for each listed file that is missing or differs; sizes first (cheap)."""
    problems = []
    for rel, expected in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, {expected.bytes} were written")
    for rel, expected in files.items():
        path = root / rel
        if path.is_file() and path.stat().st_size == expected.bytes and file_check(path).xxh3 != expected.xxh3:
            problems.append(f"{path}: content differs from what was written (checksum)")
    return problems



def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line cut by a crash is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
