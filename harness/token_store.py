"""Token stores: each data set is tokenized once into flat files that every rank reads rows from.

    <cache_dir>/tokens/<key>/
      meta.json         StoreMeta: what was tokenized, with which tokenizer, how many rows and tokens
      tokens.bin        every token id, rows back to back (uint16 when the vocabulary fits, else uint32)
      offsets.bin       int64 [rows + 1]: row r is tokens[offsets[r]:offsets[r + 1]]
      loss_mask.bin     fine-tune only, uint8 per token (aligned with tokens.bin): 0 no loss (prompt,
                        system and user turns, template text), 1 a response's content, 2 the end of
                        a response (end-of-sequence, or the chat template's end-of-turn marker)

A pretrain row is one document followed by end-of-sequence; a fine-tune row is prompt +
response + end-of-sequence, or a conversation rendered with a chat template (harness/formats.py),
where every assistant turn has loss. The key covers everything that shapes the tokens (the input
files with their size and modification time, the row shape and its columns, the tokenizer's files
and chat template) and nothing that only cuts, orders or lays out rows (seq_len, seed, packing):
every stage, rerun and run on the same data shares one store. A store is built in a folder of
its own and renamed into place when complete, so a half-built store is never used.

This module is the launch side (no torch, no numpy): keys, what a plan needs, building
missing stores in a child process (`python -m harness.store_builder`) before a stage
launches, so no distributed job waits on tokenization.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from harness import data_check, formats
from harness.plan import DataSpec, PlanError

STORE_FORMAT = 2  # 2: loss_mask.bin replaced prompt_lens.bin (a format-1 store has another key)
META = "meta.json"
TOKENS = "tokens.bin"
OFFSETS = "offsets.bin"
LOSS_MASK = "loss_mask.bin"
BYTES_TOKENIZER_ID = "bytes-v1"  # change when harness.worker.model.byte_tokenizer changes
# Every file that can change how a tokenizer folder tokenizes (plan.TOKENIZER_FILES: those that make one).
TOKENIZER_IDENTITY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                            "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                            "chat_template.jinja", "chat_template.json")
DATA_PROBLEM_EXIT = 2  # the builder's exit code for a problem in the data (missing column, unreachable hub set)


class StoreRequest(BaseModel):
    """One store a run needs: the data set, how it is read, and the tokenizer."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["pretrain", "finetune"]
    data: DataSpec
    tokenizer: str
    """'bytes' or a local tokenizer folder (the plan's, resolved)."""
    cache_dir: str
    where: str
    """The plan field this data set came from, for messages (e.g. phases[0].data)."""

    @property
    def key(self) -> str:
        return store_key(self.kind, self.data, self.tokenizer)

    @property
    def folder(self) -> Path:
        return Path(self.cache_dir) / "tokens" / self.key


class StoreMeta(BaseModel):
    """meta.json of a complete store."""

    format: int
    key: str
    kind: Literal["pretrain", "finetune"]
    dtype: Literal["uint16", "uint32"]
    rows: int
    tokens: int
    input_bytes: int
    inputs: list[str]
    tokenizer: str
    build_seconds: float

    @classmethod
    def read(cls, folder: Path) -> StoreMeta:
        return cls.model_validate_json((folder / META).read_text())


@functools.lru_cache(maxsize=None)  # every stage's key needs it; the files do not change during a run
def tokenizer_id(tokenizer: str) -> str:
    """Identity of a tokenizer: the byte tokenizer's version, or a digest of a folder's tokenizer files."""
    if tokenizer == "bytes":
        return BYTES_TOKENIZER_ID
    digest = hashlib.sha256()
    for name in TOKENIZER_IDENTITY_FILES:
        path = Path(tokenizer) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _input_ids(spec: DataSpec) -> list:
    if spec.hub is not None:
        return ["hub", spec.hub, spec.split]
    return [[f, stat.st_size, stat.st_mtime_ns] for f in spec.files for stat in [os.stat(f)]]


def store_key(kind: str, spec: DataSpec, tokenizer: str) -> str:
    """The store's folder name: '<kind>-<digest of inputs, columns, format and tokenizer>'."""
    text = json.dumps([STORE_FORMAT, kind, _input_ids(spec), spec.resolved_format(), _row_fields(kind, spec), tokenizer_id(tokenizer)])
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _row_fields(kind: str, spec: DataSpec) -> list:
    """What shapes a row's tokens besides the input: its columns, and for chat-rendered rows the
    row shape and the built-in template (a tokenizer's own template is among its files)."""
    if kind == "pretrain":
        return [spec.text_field]
    if not formats.uses_template(spec):
        return [spec.prompt_field, spec.response_field]
    columns = [spec.instruction_field, spec.input_field, spec.output_field, spec.system_field, spec.history_field] if spec.rows == "alpaca" else [spec.messages_field]
    return [spec.rows, columns, hashlib.sha256(formats.BUILTIN_CHAT_TEMPLATE.encode()).hexdigest()[:16]]


def count_rows(spec: DataSpec) -> int:
    """Rows of a local data set, without tokenizing: parquet metadata, the length of a JSON array
    (read whole, as the builder reads it), or non-empty lines."""
    rows = 0
    for file in spec.files:
        fmt = spec.resolved_format()
        if fmt == "parquet":
            import pyarrow.parquet

            rows += pyarrow.parquet.ParquetFile(file).metadata.num_rows
            continue
        with data_check.OPENERS.get(os.path.splitext(file)[1], open)(file, "rt") as f:
            if fmt == "json" and data_check.is_json_array(file):
                try:
                    rows += len(json.load(f))
                except json.JSONDecodeError as error:  # past the sample data_check read
                    raise PlanError([(file, "not valid JSON", f"a JSON array of row objects ({error.msg} at line {error.lineno} column {error.colno})")]) from None
            else:
                rows += sum(1 for line in f if line.strip())
    return rows


def stage_stores(stage) -> dict[str, StoreRequest]:
    """The stores a stage reads, by kind ('pretrain', 'finetune')."""
    requests = {}
    for kind in ("pretrain", "finetune"):
        spec = getattr(stage.data, kind)
        if spec is not None:
            where = f"stage '{stage.name}' data" + (f".{kind}" if stage.kind == "multistep" else "")
            requests[kind] = StoreRequest(kind=kind, data=spec, tokenizer=stage.model.tokenizer, cache_dir=stage.cache_dir, where=where)
    return requests


def required_stores(stages) -> list[StoreRequest]:
    """Every distinct store the stages read, in first-use order."""
    requests: dict[str, StoreRequest] = {}
    for stage in stages:
        for request in stage_stores(stage).values():
            requests.setdefault(request.key, request)
    return list(requests.values())


def describe(request: StoreRequest) -> dict[str, str]:
    """A row for `harness plan`: the store, its inputs, and whether it is ready or will be built."""
    spec = request.data
    inputs = f"hub {spec.hub} [{spec.split}]" if spec.hub else f"{len(spec.files)} file(s), {_mb(sum(os.stat(f).st_size for f in spec.files))}"
    if (request.folder / META).is_file():
        meta = StoreMeta.read(request.folder)
        size = meta.tokens * (2 if meta.dtype == "uint16" else 4) + 8 * (meta.rows + 1) + (meta.tokens if meta.kind == "finetune" else 0)
        state = f"ready: {meta.rows:,} rows, {meta.tokens:,} tokens, {_mb(size)}"
    elif spec.hub:
        state = "to build"
    else:  # bytes: a token a byte, 2 bytes each; subword tokenizers: about 4 bytes a token, 2-4 bytes each
        state = f"to build, about {_mb(sum(os.stat(f).st_size for f in spec.files) * (2 if request.tokenizer == 'bytes' else 1))}"
    return {"key": request.key, "kind": request.kind, "inputs": inputs, "state": state}


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def build_missing(requests: list[StoreRequest], echo=print) -> None:
    """Build every store that is not complete yet, one child process each (it shows a progress
    bar). A problem in the data itself becomes a PlanError naming the data set (exit 2)."""
    for request in requests:
        if (request.folder / META).is_file():
            continue
        echo(f"[harness] tokenizing {request.where} into {request.folder}")
        result = subprocess.run([sys.executable, "-m", "harness.store_builder", request.model_dump_json()], stderr=subprocess.PIPE, text=True)
        if result.returncode == DATA_PROBLEM_EXIT:
            raise PlanError([(request.where, request.data.hub or request.data.files, result.stderr.strip().splitlines()[-1])])
        if result.returncode != 0:
            raise RuntimeError(f"tokenizing {request.where} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
