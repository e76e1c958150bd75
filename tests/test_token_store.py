"""Token stores: the same batches as before stores existed, every input form, safe builds."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT
from harness.plan import DataSpec, expand_files
from harness.jobs.store_builder import build
from harness.stages.stores import store_request
from harness.records.token_store import META, TOKENS, StoreMeta, StoreRequest
from harness.worker.objectives import open_data
from harness.worker.data import SampleStream, eval_batches
from harness.worker.model import byte_tokenizer


def request(kind: str, spec: DataSpec, cache: Path) -> StoreRequest:
    return store_request(kind, spec, "bytes", str(cache), "data")


def batch_digest(batch) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(batch[key]).astype(np.int64)).tobytes())
    return h.hexdigest()


# Computed with the sample order computed per position (issue 24: keyed Feistel permutations; the
# token stores themselves are unchanged), for plans/data with the byte tokenizer and seed 1234:
# batch of 8 at position 0, a batch crossing into the second epoch, the first held-out batch of 4.
FROZEN = {
    "pretrain": dict(seq_len=64, n_train=7179, n_eval=64,
                     batch0="cc1399fb661b7a2ce8d877feae23940a4002ae2aa6ef2d21f9b93366c0fa727c",
                     epoch_cross="643c561f44d85db15a1623b839d054553439ad4a02cca2f8991f1e5d2a9599c7",
                     eval0="ce9dd40c8600bfa988575836027d06e871cb59db88a1258647c6397b233ad4e8",
                     row1=[68, 220, 52, 77, 72, 66, 78, 67, 68, 220, 77, 84, 76, 68, 81, 72]),
    "finetune": dict(seq_len=48, n_train=760, n_eval=40,
                     batch0="55f6f0bb3eab962c6516f9c2b56d030e3180de71967302f89df0b634d9fbbf06",
                     epoch_cross="04f4284b89a827b352b0807cee7dce7842b0e52931c58ac8e7a60063925a13b6",
                     eval0="7e2007d413c3bf933ff25f8107798235086f0b8d146abb096101581c420633e8",
                     row0=[48, 25, 220, 81, 68, 79, 68, 64, 83, 220, 86, 71, 68, 75, 80, 198]),
}


def test_batches_from_the_store_equal_the_batches_before_stores(tmp_path):
    for kind, source in (("pretrain", PRETRAIN_TEXT), ("finetune", FINETUNE_JSONL)):
        frozen = FROZEN[kind]
        req = request(kind, DataSpec(files=[str(source)]), tmp_path)
        build(req)
        data = open_data(req, frozen["seq_len"], 1234, byte_tokenizer().pad_token_id)
        stream = SampleStream(data)
        assert (data.n_train, len(data.eval["input_ids"])) == (frozen["n_train"], frozen["n_eval"])
        first = stream.batch(0, 8)
        assert batch_digest(first) == frozen["batch0"], kind
        assert batch_digest(stream.batch(data.n_train - 3, 8)) == frozen["epoch_cross"], kind
        assert batch_digest(eval_batches(data, 4, 2, 0, 1)[0][0]) == frozen["eval0"], kind
        row = 1 if kind == "pretrain" else 0
        assert first["input_ids"][row, :16].tolist() == frozen[f"row{row}"]


def test_store_is_compact_and_independent_of_seq_len_and_seed(tmp_path):
    req = request("pretrain", DataSpec(files=[str(PRETRAIN_TEXT)]), tmp_path)
    build(req)
    meta = StoreMeta.read(req.folder)
    assert meta.dtype == "uint16", "259 byte tokens fit in 16 bits"
    assert (req.folder / TOKENS).stat().st_size == 2 * meta.tokens
    short, long = (open_data(req, n, seed, 0) for n, seed in ((32, 1), (128, 2)))
    assert short.samples.count == meta.tokens // 32 and long.samples.count == meta.tokens // 128
    assert [p.name for p in tmp_path.joinpath("tokens").iterdir() if not p.name.endswith(".lock")] == [req.key]


def test_globs_gzip_and_parquet_give_the_same_tokens_as_plain_jsonl(tmp_path):
    docs = [{"text": f"document {i}: " + "word " * (i % 17)} for i in range(300)]
    shards = [docs[:100], docs[100:200], docs[200:]]
    for k, shard in enumerate(shards):
        lines = "".join(json.dumps(d) + "\n" for d in shard)
        (tmp_path / f"plain-{k}.jsonl").write_text(lines)
        with gzip.open(tmp_path / f"shard-{k}.jsonl.gz", "wt") as f:
            f.write(lines)
        pq.write_table(pa.table({"text": [d["text"] for d in shard]}), tmp_path / f"part-{k}.parquet")

    def tokens(pattern: str) -> np.ndarray:
        spec = DataSpec(files=expand_files([pattern], tmp_path))
        req = request("pretrain", spec, tmp_path / "cache")
        build(req)
        return np.fromfile(req.folder / TOKENS, dtype=np.uint16)

    plain = tokens("plain-*.jsonl")
    assert len(plain) > 300
    assert np.array_equal(tokens("shard-*.jsonl.gz"), plain)
    assert np.array_equal(tokens("part-*.parquet"), plain)
    assert len(expand_files(["shard-*.jsonl.gz"], tmp_path)) == 3


def _builder(req: StoreRequest) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.jobs.store_builder", req.model_dump_json()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _big_text(path: Path, megabytes: int) -> Path:
    paragraph = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n").encode()
    with open(path, "wb") as f:
        for _ in range(megabytes * (1 << 20) // len(paragraph)):
            f.write(paragraph)
    return path


def test_two_builders_at_once_build_the_store_once(tmp_path):
    req = request("pretrain", DataSpec(files=[str(_big_text(tmp_path / "text.txt", 4))]), tmp_path / "cache")
    builders = [_builder(req), _builder(req)]
    outputs = [b.communicate(timeout=300)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    assert sum("token store" in out for out in outputs) == 1, "one joined it, the other found it joined"
    meta = StoreMeta.read(req.folder)
    assert meta.pieces == 4 and meta.tokens == meta.input_bytes - meta.rows, "every piece once: a token a byte, a blank line an end of sequence"
    assert (req.folder / META).is_file()
    assert set(os.listdir(req.folder.parent)) == {req.key, f"{req.key}.lock"}, "no partial folder left"
