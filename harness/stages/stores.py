"""Which token stores the stages read, and each store's key: everything that shapes its tokens
(the input files with their size and modification time, the format, what the objective's rows
take from them, the tokenizer's files) and nothing that only cuts, orders or lays out rows
(seq_len, seed, packing), so every stage, rerun and run on the same data shares one store.
Pure but for reading the files' sizes and times and the tokenizer's files."""
from __future__ import annotations

import hashlib
import json
import os

from harness.objectives import OBJECTIVES
from harness.plan import DataSpec
from harness.records.token_store import STORE_FORMAT, StoreRequest, tokenizer_id
from harness.stages.stage import Stage


def _input_ids(spec: DataSpec) -> list:
    if spec.hub is not None:
        return ["hub", spec.hub, spec.split]
    return [[f, stat.st_size, stat.st_mtime_ns] for f in spec.files for stat in [os.stat(f)]]


def store_key(kind: str, spec: DataSpec, tokenizer: str) -> str:
    """The store's folder name: '<kind>-<digest of inputs, columns, format and tokenizer>'."""
    text = json.dumps([STORE_FORMAT, kind, _input_ids(spec), spec.resolved_format(), OBJECTIVES[kind].key_fields(spec), tokenizer_id(tokenizer)])
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def store_request(kind: str, spec: DataSpec, tokenizer: str, cache_dir: str, where: str) -> StoreRequest:
    """The store of one data set read by the objective `kind` (where: the plan field, for messages)."""
    return StoreRequest(kind=kind, data=spec, tokenizer=tokenizer, cache_dir=cache_dir, where=where, key=store_key(kind, spec, tokenizer))


def stage_stores(stage: Stage) -> dict[str, list[StoreRequest]]:
    """The stores a stage reads, by objective kind: one, or one per source of a mixture."""
    requests = {}
    for kind, spec in stage.data.sets.items():
        where = f"stage '{stage.name}' data" + (f".{kind}" if len(stage.data.sets) > 1 else "")
        requests[kind] = [store_request(kind, one, stage.model.tokenizer, stage.cache_dir, f"{where}.sources[{k}]" if spec.sources else where)
                          for k, (one, _) in enumerate(spec.weighted_sets())]
    return requests


def required_stores(stages: list[Stage]) -> list[StoreRequest]:
    """Every distinct store the stages read, in first-use order."""
    requests: dict[str, StoreRequest] = {}
    for stage in stages:
        for request in (r for kind_requests in stage_stores(stage).values() for r in kind_requests):
            requests.setdefault(request.key, request)
    return list(requests.values())
