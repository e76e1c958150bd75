"""Weighted mixtures in a phase: two sources of disjoint tokens drawn 0.8/0.2 give those shares of
the tokens trained on; a source that runs out repeats (recorded, warned about at plan time) or
stops the phase; a resumed stage continues the mixture's stream."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import FINETUNE_JSONL, harness, make_plan, manifests, metric_rows, write_plan
from harness.cli import main
from harness.records import StageDir
from harness.records.token_store import StoreMeta
from harness.stages import StageFile, eval_size
from harness.stages.mixture import Mixture, mix_plan
from harness.plan import DataSpec
from harness.worker.data import SampleStream
from harness.worker.objectives import open_stage_data
from harness.worker.tokenizer import byte_tokenizer

SEQ, BATCH, STEPS = 32, 16, 10
LETTERS, DIGITS = "abcdefghijklm", "0123456789"


def corpus(path: Path, alphabet: str, lengths: list[int]) -> str:
    rng = random.Random(alphabet)
    path.write_text("".join("".join(rng.choice(alphabet) for _ in range(n)) + "\n\n" for n in lengths))
    return str(path)


def token_ids(alphabet: str) -> set[int]:
    return set(byte_tokenizer().backend_tokenizer.encode(alphabet, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    # letters: about 1,400 blocks of SEQ tokens; digits: 25 blocks, 24 of them train (fewer than the 32 a phase draws)
    letters = corpus(folder / "letters.txt", LETTERS, [random.Random(k).randint(50, 250) for k in range(300)])
    digits = corpus(folder / "digits.txt", DIGITS, [200] * 4)
    sources = [{"files": [letters], "weight": 0.8}, {"files": [digits], "weight": 0.2}]
    phases = [
        {"name": "mix", "kind": "pretrain", "steps": STEPS, "global_batch": BATCH, "checkpoint_every": 4, "data": {"sources": sources}},
        {"name": "stops", "kind": "pretrain", "steps": 20, "global_batch": BATCH, "data": {
            "sources": [{"files": [letters], "weight": 1}, {"files": [digits], "weight": 1}], "exhausted": "stop"}},
    ]
    plan = make_plan("mixed", phases, port=30340, cache_dir=str(folder / "cache"), defaults={
        "seq_len": SEQ, "micro_batch": 4, "eval_every": 1000, "eval_batches": 2, "optimizer": {"type": "AdamW", "lr": 3e-3}})
    plan_path, out = write_plan(folder, plan), folder / "run"
    shown = harness("plan", plan_path, "--out", out, check=True)
    failed = harness("run", plan_path, "--out", out, env={**os.environ, "HARNESS_FAULT": "mix:step6:1"})
    rerun = harness("run", plan_path, "--out", out, check=True)
    return out, shown, failed, rerun


def test_two_sources_are_drawn_in_their_weights_within_one_percent(mixed):
    out = mixed[0]
    stage = StageFile.read(StageDir(out / "phases" / "00-mix").stage_json).stage
    stream = SampleStream(open_stage_data(stage, 0)["pretrain"])
    drawn = np.concatenate([stream.batch(p, 4)["input_ids"].numpy().ravel() for p in range(0, STEPS * BATCH, 4)])
    letters, digits = np.isin(drawn, list(token_ids(LETTERS))).sum(), np.isin(drawn, list(token_ids(DIGITS))).sum()
    assert letters + digits > 0.9 * len(drawn), "the rest are ends of documents"
    assert abs(letters / (letters + digits) - 0.8) < 0.01, "the tokens trained on are 0.8 / 0.2, as weighted"
    (mix,) = [m for m in manifests(out) if m["stage"] == "mix"]
    letters_draw, digits_draw = mix["data_mix"]["pretrain"]
    assert (letters_draw["samples"], digits_draw["samples"]) == (128, 32) and letters_draw["tokens"] == 128 * SEQ
    rows = metric_rows(out / "phases" / "00-mix")
    counted = [sum(row[f"data/pretrain_source{k}_tokens"] for row in rows) for k in (0, 1)]
    assert counted == [letters_draw["tokens"], digits_draw["tokens"]], "the ranks' batches held what the manifest records"
    assert abs(counted[0] / sum(counted) - 0.8) < 0.01


def test_a_source_that_runs_out_repeats_recorded_and_warned_about_at_plan_time(mixed):
    out, shown, _, _ = mixed
    (mix,) = [m for m in manifests(out) if m["stage"] == "mix"]
    digits = mix["data_mix"]["pretrain"][1]
    assert digits["epochs"] > 1, "up-sampled: its epochs recorded"
    assert "data mixtures" in shown.stdout and "digits.txt" in shown.stdout
    assert "warning: phase 'mix' draws about" in shown.stdout and "of pretrain source 1 (digits.txt): it repeats" in shown.stdout
    assert "phase 'stops'" not in shown.stdout.split("warning")[-1], "data.exhausted set: no warning"


def test_a_resumed_mixture_continues_its_stream(mixed):
    out, _, failed, rerun = mixed
    assert failed.returncode == 1 and "resuming from checkpoint step4" in rerun.stdout
    stage_dir = out / "phases" / "00-mix"
    assert [row["stage_step"] for row in metric_rows(stage_dir)] == list(range(1, STEPS + 1)), "no step lost or repeated"
    (mix,) = [m for m in manifests(out) if m["stage"] == "mix"]
    assert list(mix["data_position"].values()) == [STEPS * BATCH]
    assert [d["samples"] for d in mix["data_mix"]["pretrain"]] == [128, 32], "the mix over the whole stage, across the resume"


def test_a_source_that_runs_out_stops_the_phase_when_asked(mixed):
    out, _, _, rerun = mixed
    (store,) = [p for p in (out.parent / "cache" / "tokens").iterdir() if (p / "meta.json").is_file() and "digits" in str(StoreMeta.read(p).inputs)]
    blocks = StoreMeta.read(store).tokens // SEQ
    train = blocks - eval_size(blocks, DataSpec(files=["x"]))
    (stops,) = [m for m in manifests(out) if m["stage"] == "stops"]
    assert stops["stage_steps"] == train // (BATCH // 2) < 20, "half of each step is the small source: it ends before its second epoch"
    assert stops["data_mix"]["pretrain"][1]["epochs"] <= 1
    assert "has no unseen samples left" in rerun.stdout


def test_the_interleave_holds_every_prefix_to_its_share():
    plan = mix_plan(DataSpec(sources=[{"files": ["a"], "weight": 7}, {"files": ["b"], "weight": 2}, {"files": ["c"], "weight": 1}]))
    mixture = Mixture(plan)
    assert plan.quotas == [7000, 2000, 1000]
    sources, within = mixture.split(np.arange(25_000))
    for k, share in enumerate((0.7, 0.2, 0.1)):
        counts = np.cumsum(sources == k)
        assert np.abs(counts - share * np.arange(1, 25_001)).max() <= 1, "each prefix within a sample of its share"
        assert (within[sources == k] == np.arange(counts[-1])).all(), "each source's own stream, in order, nothing skipped"
    assert (mixture.drawn(25_000) == [17_500, 5_000, 2_500]).all()


def test_bad_mixtures_are_refused_naming_each_field(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n\n" * 50)
    phase = {"name": "p", "kind": "pretrain", "steps": 2, "data": {"sources": [{"files": ["a.txt"], "weight": 1}, {"files": ["missing.txt"], "weight": 1}]}}
    flat = {"name": "q", "kind": "pretrain", "steps": 2, "data": {"files": ["a.txt"], "exhausted": "stop"}}
    pairs = {"name": "r", "kind": "preference", "steps": 2, "data": {"sources": [{"files": ["a.txt"], "weight": 1}]}}
    plan = write_plan(tmp_path, make_plan("bad", [phase, flat, pairs], port=30350))
    assert main(["plan", str(plan), "--out", str(tmp_path / "run")]) == 2
    refused = capsys.readouterr().err
    assert "phases[0].data.sources[1].files[0]" in refused and "missing.txt" in refused
    assert "phases[1].data" in refused and "exhausted applies to a mixture (sources)" in refused
    assert "phases[2].data.sources" in refused and "a preference phase reads one data set" in refused
    assert not (tmp_path / "run").exists()


def test_each_side_of_a_multistep_phase_may_be_a_mixture(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n\n" * 400)
    (tmp_path / "b.txt").write_text("0123456789\n\n" * 40)
    sources = [{"files": ["a.txt"], "weight": 3}, {"files": ["b.txt"], "weight": 1}]
    multistep = {"name": "m", "kind": "multistep", "cycles": 1, "stages": [{"steps": 4}],
                 "data": {"pretrain": {"sources": sources}, "finetune": {"files": [str(FINETUNE_JSONL)]}}}
    plan = write_plan(tmp_path, make_plan("sides", [multistep], port=30360, defaults={"seq_len": 32, "global_batch": 8}))
    assert main(["plan", str(plan), "--out", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr().out
    assert "data mixtures" in shown and "a.txt" in shown and "b.txt" in shown
    (stage_json,) = (tmp_path / "run" / "phases").glob("*/stage.json")
    assert StageFile.read(stage_json).stage.data.mixes["pretrain"].quotas == [7500, 2500]

    sources[1]["weight"] = 0
    plan = write_plan(tmp_path, make_plan("sides", [multistep], port=30360))
    assert main(["plan", str(plan), "--out", str(tmp_path / "run2")]) == 2
    refused = capsys.readouterr().err
    assert "phases[0].data.pretrain.sources[1].weight" in refused and "greater than 0" in refused
    assert not (tmp_path / "run2").exists()
