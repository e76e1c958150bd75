"""The sample order computed per position: a bijection per epoch that never trains a held-out
sample, memory that does not grow with the data set (a simulated billion samples), a reopened
stream that continues at the exact position, and older run folders refused, saying why."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from conftest import PRETRAIN_TEXT, make_plan, pretrain_phase, write_plan
from harness.cli import main
from harness.jobs.store_builder import build
from harness.plan import DataSpec
from harness.records.token_store import META, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest
from harness.stages.stores import store_request
from harness.worker.data import SampleStream
from harness.worker.objectives import open_data
from harness.worker.order import EpochOrder, Permutation

ORDER_BUDGET_BYTES = 1 << 20  # the stored permutations took 16 bytes per sample: 16 MB at 10^6, 16 GB at 10^9


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_each_permutation_is_a_bijection(n):
    assert sorted(Permutation(n, key=n).__call__(np.arange(n)).tolist()) == list(range(n))


def test_every_epoch_visits_every_training_sample_once_and_never_a_held_out_one():
    order = EpochOrder(n=1000, n_eval=50, seed=3)
    held_out = set(order.held_out().tolist())
    epochs = [order.at(np.arange(e * 950, (e + 1) * 950)).tolist() for e in range(3)]
    assert len(held_out) == 50
    assert all(sorted(epoch) == sorted(set(range(1000)) - held_out) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2], "each epoch its own order"
    assert EpochOrder(1000, 50, seed=4).held_out().tolist() != order.held_out().tolist()


def sparse_store(folder, samples: int, seq_len: int) -> StoreRequest:
    """A pretrain store of samples x seq_len tokens whose token file is a hole (reads give zeros):
    a data set of any size, in no disk space."""
    request = StoreRequest(kind="pretrain", data=DataSpec(files=[str(PRETRAIN_TEXT)]), tokenizer="bytes", cache_dir=str(folder),
                           where="data", key="pretrain-simulated")
    request.folder.mkdir(parents=True)
    tokens = samples * seq_len
    with open(request.folder / TOKENS, "wb") as f:
        f.truncate(2 * tokens)
    np.array([0, tokens], np.int64).tofile(request.folder / OFFSETS)
    meta = StoreMeta(format=STORE_FORMAT, key=request.key, kind="pretrain", dtype="uint16", rows=1, tokens=tokens, input_bytes=0,
                     inputs=["simulated"], tokenizer="bytes-v1", build_seconds=0)
    (request.folder / META).write_text(meta.model_dump_json())
    return request


@pytest.mark.parametrize("samples", [10**6, 10**9])
def test_the_order_of_a_billion_samples_costs_what_a_million_cost(tmp_path, samples):
    request = sparse_store(tmp_path, samples, seq_len=4)
    tracemalloc.start()
    data = open_data(request, 4, 1234, 0)
    stream = SampleStream(data)
    batches = [stream.batch(position, 8) for position in (0, samples // 2, 3 * samples + 5, 10**12)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert data.n_train == samples - 64 and all(b["input_ids"].shape == (8, 4) for b in batches)
    assert peak < ORDER_BUDGET_BYTES, f"{peak:,} bytes for the order of {samples:,} samples"


def test_a_reopened_stream_continues_at_the_exact_position(tmp_path):
    request = store_request("pretrain", DataSpec(files=[str(PRETRAIN_TEXT)]), "bytes", str(tmp_path), "data")
    build(request)
    first = SampleStream(open_data(request, 64, 7, 0))
    positions = [0, 8, first.data.n_train - 3, 5 * first.data.n_train + 11]  # within, across and far beyond epochs
    before = [first.batch(p, 8)["input_ids"] for p in positions]
    again = SampleStream(open_data(request, 64, 7, 0))  # a resumed rank: new objects, the recorded position
    assert all((again.batch(p, 8)["input_ids"] == b).all() for p, b in zip(reversed(positions), reversed(before)))
    other_seed = SampleStream(open_data(request, 64, 8, 0))
    assert not (other_seed.batch(0, 8)["input_ids"] == before[0]).all()


def test_a_run_folder_of_the_stored_permutations_is_refused_saying_why(tmp_path, capsys):
    plan = write_plan(tmp_path, make_plan("older", [pretrain_phase("pre", steps=4)], port=30330))
    out = tmp_path / "run"
    assert main(["plan", str(plan), "--out", str(out)]) == 0
    marker = out / "phases" / "00-pre" / "checkpoints" / "step2" / "complete"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"format": 4, "progress": {"stage_step": 2, "data_position": {"pretrain-0123": 16}}, "engine": {}, "files": {}}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert main(["run", str(plan), "--out", str(out)]) == 2
    refused = capsys.readouterr().err
    assert "step2/complete (format 4: its data positions count samples in the stored permutations" in refused
    assert "continuing mid-epoch would repeat some samples and skip others" in refused
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before, "nothing written or launched"
