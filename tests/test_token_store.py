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


# Computed with the code before token stores (tokenize every row in each rank's memory), for
# plans/data with the byte tokenizer and seed 1234: batch of 8 at position 0, a batch crossing
# into the second epoch, the first held-out batch of 4.
FROZEN = {
    "pretrain": dict(seq_len=64, n_train=7179, n_eval=64,
                     batch0="f42b5cf0d89a9ceceddf263ef5e1d31a737cce1b574b2b09f98bce8efa3b2380",
                     epoch_cross="48fa594c7243f7f67973c42a24b4c47018b5116242e78fdb096b6a79ffafb0c5",
                     eval0="d7eb51a530b64407dc622c189f8a9cf442b7fbce4a57aefd5886d322eab77540",
                     row1=[220, 65, 68, 72, 77, 70, 220, 66, 64, 75, 75, 68, 67, 198, 220, 220]),
    "finetune": dict(seq_len=48, n_train=760, n_eval=40,
                     batch0="4d569438e196b30f793fd0fb53ce1fbb9c7b3f67283209f158157c35c118f385",
                     epoch_cross="131418d823351f8c21381ee8a020018e7a53aeaf3b9235dd23b26f99f337cbe8",
                     eval0="c78d7a746683bf3317fba53763d120b767cfbd7273dd052a429cba1250bdcfbe",
                     row0=[48, 25, 220, 81, 68, 79, 68, 64, 83, 220, 65, 68, 71, 198, 32, 25]),
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
