"""Read offline W&B run files (`run-<id>.wandb`) with wandb's own protobufs.

The file is a LevelDB-style log: a 7-byte header (":W&B" + version), then 32 KiB
blocks of chunks, each `crc32 (4) | length (2) | type (1) | payload`; type 1 is a
whole record, 2/3/4 the first/middle/last piece of a record split over blocks.
Adapted from shared/reference/wandb/read_offline_run.py.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


@dataclass
class OfflineRun:
    """What one offline run file holds."""

    path: Path
    id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    exit_code: int | None = None


def raw_records(path: Path) -> Iterator[bytes]:
    """Each record's serialized bytes, pieces joined."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer too short for a chunk header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += left
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            yield pieces + payload
            pieces = b""


def _items(updates) -> dict[str, Any]:
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


def read_run(path: Path) -> OfflineRun:
    """Parse one `run-<id>.wandb` file."""
    run = OfflineRun(Path(path))
    for data in raw_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.project, run.group, run.name, run.job_type = r.run_id, r.project, r.run_group, r.display_name, r.job_type
            run.tags = list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under a `wandb/` folder, oldest first (folders carry a timestamp)."""
    return [read_run(f) for f in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))]
