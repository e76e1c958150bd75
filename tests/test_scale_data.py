"""A corpus larger than the old per-rank cost allows trains within a small per-rank budget; its
token store is built once, before launch, and reused by later stages and reruns; data that
cannot be read is bad input (exit 2) before anything is written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import harness, make_plan, metric_rows, pretrain_phase, write_plan

CORPUS_MB = 40
# Before token stores every rank held about 120 bytes per corpus byte (issue 8: 20 MB -> 2.95 GB
# per rank), so this corpus needed ~4.8 GB per rank. A rank now holds its model, its batches
# and the memory-mapped pages it reads.
RANK_BUDGET_BYTES = 1_500_000_000


def write_corpus(path: Path, megabytes: int) -> Path:
    paragraphs = "".join(f"Paragraph {i} tells of the {i % 97}th fox and the {i % 13}th dog. " * (i % 5 + 1) + "\n\n" for i in range(5000)).encode()
    with open(path, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(paragraphs) + 1):
            f.write(paragraphs)
    return path


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    corpus = write_corpus(folder / "corpus.txt", CORPUS_MB)
    data = {"files": [str(corpus)]}
    plan = make_plan("big", [pretrain_phase("first", data=data, steps=3), pretrain_phase("second", data=data, steps=3)],
                     port=29720, cache_dir=str(folder / "cache"))
    plan_path = write_plan(folder, plan)
    out = folder / "run"
    first = harness("run", plan_path, "--out", out, check=True)
    rerun = harness("run", plan_path, "--out", out, check=True)
    return folder, out, first, rerun


def test_a_corpus_beyond_the_old_per_rank_cost_trains_within_the_budget(big_run):
    folder, out, _, _ = big_run
    assert (folder / "corpus.txt").stat().st_size > CORPUS_MB * 1_000_000
    for stage in ("00-first", "01-second"):
        ranks = out / "phases" / stage / "ranks"
        peaks = [json.loads((ranks / f"memory-rank{r}.json").read_text())["peak_rss_bytes"] for r in range(2)]
        assert all(0 < peak < RANK_BUDGET_BYTES for peak in peaks), (stage, peaks)
        assert [r["stage_step"] for r in metric_rows(out / "phases" / stage)] == [1, 2, 3]


def test_the_store_is_built_once_before_launch_and_reused(big_run):
    folder, out, first, rerun = big_run
    stores = [p for p in (folder / "cache" / "tokens").iterdir() if p.is_dir()]
    assert len(stores) == 1 and stores[0].name.startswith("pretrain-")
    assert first.stdout.count("[harness] tokenizing") == 1, "the second stage reused the store"
    assert first.stdout.index("[harness] tokenizing") < first.stdout.index("stage 00 first"), "built before the first launch"
    assert "tokenizing" not in rerun.stdout and rerun.stdout.count("done, skipped") == 2
    meta = json.loads((stores[0] / "meta.json").read_text())
    assert meta["input_bytes"] == (folder / "corpus.txt").stat().st_size
    second = json.loads((out / "phases" / "01-second" / "manifest.json").read_text())
    first_manifest = json.loads((out / "phases" / "00-first" / "manifest.json").read_text())
    (key, position), = second["data_position"].items()
    assert position == first_manifest["data_position"][key] + 3 * 8, "the second stage continued the first's data position"


# The plan check reads the first 1,000 lines of a file (harness/objectives/samples.py); the token store
# builder, which reads everything, catches the rest: both before anything is written.
@pytest.mark.parametrize("data, where, named", [
    ({"hub": "no-such-org/no-such-set"}, "stage 'pre' data", "no-such-org/no-such-set"),
    ({"files": ["rows.jsonl"], "text_field": "body"}, "phases[0].data.files[0]", "rows with a column 'body' (line 1 has none"),
    ({"files": ["broken.jsonl"]}, "phases[0].data.files[0]", "line 51 is not valid JSON"),
    ({"files": ["late.jsonl"]}, "stage 'pre' data", "late.jsonl cannot be read (ArrowInvalid: JSON parse error"),
])
def test_data_that_cannot_be_read_is_exit_2_before_anything_is_written(tmp_path, data, where, named):
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n' * 50)
    (tmp_path / "broken.jsonl").write_text('{"text": "a row"}\n' * 50 + '{"text": no quotes}\n')
    (tmp_path / "late.jsonl").write_text('{"text": "a row"}\n' * 1500 + '{"text": no quotes}\n')
    plan = make_plan("bad", [{"name": "pre", "kind": "pretrain", "data": data, "steps": 2}], port=29730, cache_dir=str(tmp_path / "cache"))
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = harness("run", write_plan(tmp_path, plan), "--out", tmp_path / "run", env=offline)
    assert result.returncode == 2, result.stderr
    assert where in result.stderr and named in result.stderr
    assert not (tmp_path / "run").exists()
