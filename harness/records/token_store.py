"""Token stores: each data set is tokenized once into flat files that every rank reads rows from.

    <cache_dir>/tokens/<key>/
      meta.json         StoreMeta: what was tokenized, with which tokenizer, how many rows and tokens
      tokens.bin        every token id, rows back to back (uint16 when the vocabulary fits, else uint32)
      offsets.bin       int64 [rows + 1]: row r is tokens[offsets[r]:offsets[r + 1]]
      loss_mask.bin     for objectives with one (fine-tune), uint8 per token (aligned with tokens.bin):
                        0 no loss (prompt, system and user turns, template text), 1 a response's
                        content, 2 the end of a response (end-of-sequence, or the end-of-turn marker)
      reference/        preference stores: reference log-probabilities per pair, one file per start
                        weights (reference_file), written by a stage's rank 0 after the store was built

Each objective says what a row is (harness/objectives/): a pretrain row is one document followed
by end-of-sequence; a fine-tune row is prompt + response + end-of-sequence, or a conversation
rendered with a chat template. The key (harness/stages/stores.py) covers everything that shapes
the tokens and nothing that only cuts, orders or lays out rows (seq_len, seed, packing): every
stage, rerun and run on the same data shares one store. A store is built in a folder of its own
(harness/jobs/store_builder.py) and renamed into place when complete, so a half-built store is
never used.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from harness.plan import DataSpec

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


def reference_file(store: Path, weights_digest: str, seq_len: int, precision: str) -> Path:
    """The reference log-probabilities of a preference store's pairs under weights of this digest,
    rows cut to seq_len, forwards in this precision: float64 [pairs, 2] (chosen, rejected), each the
    sum over its response's trained tokens (harness/worker/objectives/preference.py)."""
    return store / "reference" / f"{weights_digest}-len{seq_len}-{precision}.npy"


class StoreRequest(BaseModel):
    """One store a run needs: the data set, the objective that reads it, the tokenizer, its key."""

    model_config = ConfigDict(frozen=True)

    kind: str
    """The objective whose rows it holds (harness/objectives)."""
    data: DataSpec
    tokenizer: str
    """'bytes' or a local tokenizer folder (the plan's, resolved)."""
    cache_dir: str
    where: str
    """The plan field this data set came from, for messages (e.g. phases[0].data)."""
    key: str
    """The store's folder name (harness/stages/stores.py store_key)."""

    @property
    def folder(self) -> Path:
        return Path(self.cache_dir) / "tokens" / self.key


class StoreMeta(BaseModel):
    """meta.json of a complete store."""

    format: int
    key: str
    kind: str
    dtype: str
    """uint16 or uint32."""
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
