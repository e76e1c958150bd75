"""Data the worker trains on: packing, response-only loss, held-out split, positions, mixing."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.plan import DataSpec, MixSpec
from harness.stages import StageData
from harness.jobs.store_builder import build
from harness.stages.stores import store_request
from harness.worker.objectives import open_data
from harness.worker.objectives.finetune import eval_pairs
from harness.worker.data import IGNORE_INDEX, SampleStream, TokenizedSet, eval_batches, micro_batch_position
from harness.worker.model import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def load_set(kind: str, spec: DataSpec, seq_len: int, seed: int, cache_dir) -> TokenizedSet:
    """Build the data set's token store (as the launch side does) and open it (as a rank does)."""
    request = store_request(kind, spec, "bytes", str(cache_dir), "data")
    build(request)
    return open_data(request, seq_len, seed, byte_tokenizer().pad_token_id)


def train_arrays(data: TokenizedSet) -> dict[str, np.ndarray]:
    return data.samples.arrays(data.order.at(np.arange(data.n_train)))


def test_pretrain_text_is_packed_into_full_blocks_with_eos_between_documents(tmp_path, tokenizer):
    docs = [f"document number {i} " * (i + 1) for i in range(40)]
    pq.write_table(pa.table({"body": docs}), tmp_path / "corpus.parquet")
    spec = DataSpec(files=[str(tmp_path / "corpus.parquet")], text_field="body", eval_fraction=0.1)
    data = load_set("pretrain", spec, 32, 0, tmp_path / "cache")
    train = train_arrays(data)
    stream = np.concatenate([train["input_ids"], data.eval["input_ids"]]).ravel()
    total = sum(len(d.encode()) + 1 for d in docs)
    assert len(stream) == (total // 32) * 32, "every token kept except the last partial block"
    assert (stream == tokenizer.eos_token_id).sum() >= 30
    assert (train["labels"] == train["input_ids"]).all() and "attention_mask" not in train
    assert len(data.eval["input_ids"]) == max(1, int((total // 32) * 0.1))


def test_finetune_loss_is_on_response_tokens_only(tmp_path, tokenizer):
    rows = [{"question": f"q{i}? ", "answer": f"a{i}"} for i in range(50)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(files=[str(tmp_path / "pairs.jsonl")], prompt_field="question", response_field="answer", eval_fraction=0.2)
    data = load_set("finetune", spec, 16, 0, tmp_path / "cache")
    train = train_arrays(data)
    for ids, labels, mask in zip(train["input_ids"], train["labels"], train["attention_mask"]):
        text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        prompt, response = text.split("? ", 1)
        supervised = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert supervised == response, "labels are the response and its end-of-sequence token, nothing else"
        assert (labels[mask == 0] == IGNORE_INDEX).all()
    pairs = [(tokenizer.decode(p), tokenizer.decode(r)) for p, r in eval_pairs(data)]
    assert len(pairs) == 10 and all(p.startswith("q") and p.endswith("? ") and r.startswith("a") for p, r in pairs)


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i} ", "response": f"r{i}"} for i in range(100)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(files=[str(tmp_path / "pairs.jsonl")])
    first = load_set("finetune", spec, 16, 7, tmp_path / "c1")
    again = load_set("finetune", spec, 16, 7, tmp_path / "c2")
    other = load_set("finetune", spec, 16, 8, tmp_path / "c3")
    assert eval_pairs(first) == eval_pairs(again) != eval_pairs(other)
    train = {tuple(r) for r in train_arrays(first)["input_ids"]}
    assert not train & {tuple(r) for r in first.eval["input_ids"]}


def test_ranks_take_disjoint_slices_and_positions_cross_epochs(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i} ", "response": f"r{i}"} for i in range(21)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_set("finetune", DataSpec(files=[str(tmp_path / "pairs.jsonl")]), 16, 0, tmp_path / "c")
    stream = SampleStream(data)
    n = data.n_train  # 20
    step = [stream.batch(micro_batch_position(0, 2, a, r, 2), 2)["input_ids"] for a in range(2) for r in range(2)]
    seen = [tuple(x) for b in step for x in b.tolist()]
    assert len(set(seen)) == 8, "one step of 2 ranks x 2 accumulation x micro 2 uses 8 distinct samples"
    epoch = [tuple(x) for x in stream.batch(0, n)["input_ids"].tolist()]
    assert len(set(epoch)) == n, "an epoch visits every training sample once"
    next_epoch = [tuple(x) for x in stream.batch(n, n)["input_ids"].tolist()]
    assert set(next_epoch) == set(epoch) and next_epoch != epoch, "the next epoch is a new order of the same samples"


def test_eval_batches_are_even_across_ranks(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i} ", "response": f"r{i}"} for i in range(100)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_set("finetune", DataSpec(files=[str(tmp_path / "pairs.jsonl")], eval_fraction=0.05), 16, 0, tmp_path / "c")
    shares = [eval_batches(data, micro=2, max_batches=4, rank=r, world=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]), "ZeRO-3 forwards are collective: every rank runs as many"
    assert sum(counts for share in shares for _, counts in share) == 3  # 5 samples -> 3 batches of 2


def test_mixing_picks_the_data_set_of_each_step():
    alternate = StageData(source="mix", mix="alternate")
    assert [alternate.source_at(s) for s in range(1, 5)] == ["pretrain", "finetune", "pretrain", "finetune"]
    ratio = StageData(source="mix", mix=MixSpec(pretrain=0.75, finetune=0.25))
    picks = [ratio.source_at(s) for s in range(1, 101)]
    assert picks.count("pretrain") == 75
    assert StageData(source="finetune").source_at(3) == "finetune"
