"""Preference phases with real DeepSpeed ranks, sharing three runs (module fixture):

A  sft (ZeRO-2) then dpo (ZeRO-3) on 2 ranks, swapped in one launch, W&B offline, on the demo's
   cipher pairs (chosen: the right shift, rejected: another). The fault hook kills rank 1 at dpo
   step 10; the rerun resumes elastically on 1 rank (universal checkpoint) from step 6.
B  one dpo step at ZeRO-0 on 1 rank, from A's sft handoff, with a token cache of its own: it
   computes the reference again; micro_batch auto probes with pairs.
C  B again in another run folder with B's cache: a second phase with the same data and start.

What a user relies on: the reference is computed once by the phase's ranks and reused by the
resumed phase (`harness plan` says so) and by C; 2 ZeRO-3 ranks compute the reference 1 ZeRO-0
rank computes; held-out reward accuracy climbs from 0 (every reward is 0 at the start) to >= 0.9;
TRL's metric names reach metrics.jsonl, the manifest, W&B, `harness report` and `compare`.
Ports 30110, 30120, 30130."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, harness, make_plan, manifests, metric_rows, write_plan
from harness.views.report import compare_runs, load_run, report_table

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import offline_runs  # noqa: E402

PAIRS = DATA / "cipher_pairs.jsonl"
REWARD_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
# Reference log-probabilities are sums over a response's 5 tokens (-0.03 to -54 here): 2 ZeRO-3 ranks
# and 1 ZeRO-0 rank run the same fp32 forwards in other batches (measured: equal to the bit).
TOLERANCE = 1e-4


def dpo_phase(name: str, steps: int, zero_stage: int, **settings) -> dict:
    return {"name": name, "kind": "preference", "data": {"files": [str(PAIRS)]}, "steps": steps, "zero_stage": zero_stage,
            "task_metrics": [], "optimizer": {"type": "AdamW", "lr": 2e-3}, "preference": {"loss": "dpo", "beta": 0.1}, **settings}


@dataclass
class Runs:
    folder: Path
    a: Path
    b: Path
    c: Path
    first: object
    planned: str
    reference_before: tuple[Path, float, bytes]


def reference_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("tokens/preference-*/reference/*.npy"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    folder = tmp_path_factory.mktemp("preference")
    phases = [{"name": "sft", "kind": "finetune", "data": {"files": [str(DATA / "cipher.jsonl")]}, "steps": 200, "zero_stage": 2, "task_metrics": []},
              dpo_phase("dpo", 24, 3, eval_on_start=True, eval_every=8, eval_batches=3, checkpoint_every=6)]
    plan = make_plan("pref", phases, port=30110, cache_dir=str(folder / "cache"), wandb={"mode": "offline", "project": "harness-test"})
    plan["defaults"].update(micro_batch=8, global_batch=16, seq_len=24)
    a = folder / "a"
    first = harness("run", write_plan(folder, plan), "--out", a, env={**os.environ, "HARNESS_FAULT": "dpo:step10:1"})
    (reference,) = reference_files(folder / "cache")
    before = (reference, reference.stat().st_mtime, reference.read_bytes())
    plan["cluster"]["procs_per_node"] = 1  # the rerun resumes on 1 rank
    one_rank = write_plan(folder, plan, "plan-1rank.yaml")
    planned = harness("plan", one_rank, "--out", a, "--force", check=True).stdout
    harness("run", one_rank, "--out", a, "--force", check=True)

    zero0 = make_plan("pref-z0", [dpo_phase("dpo0", 1, 0)], port=30120, procs=1, cache_dir=str(folder / "cache-z0"))
    zero0["model"] = {"path": str(a / "phases" / "00-sft" / "model")}
    zero0["defaults"].update(micro_batch="auto", global_batch=8, seq_len=24)
    zero0_plan = write_plan(folder, zero0, "plan-z0.yaml")
    harness("run", zero0_plan, "--out", folder / "b", check=True)
    zero0["cluster"]["master_port"] = 30130
    harness("run", write_plan(folder, zero0, "plan-z0-again.yaml"), "--out", folder / "c", check=True)
    return Runs(folder, a, folder / "b", folder / "c", first, planned, before)


def test_the_reference_is_computed_once_and_reused_by_the_resumed_phase(runs: Runs):
    assert runs.first.returncode != 0 and "stage 01 'dpo'" in runs.first.stderr, runs.first.stderr[-2000:]
    assert "reference log-probabilities of 400 pairs computed from the start weights" in runs.first.stdout
    assert "reference: reused (400 pairs" in runs.planned
    path, mtime, content = runs.reference_before
    assert reference_files(runs.folder / "cache") == [path] and path.stat().st_mtime == mtime and path.read_bytes() == content
    sft, dpo = manifests(runs.a)
    assert path.name.startswith(dpo["start_weights_digest"]) and dpo["start_weights_digest"] == sft["weights_digest"]
    assert dpo["reference"] == {"file": str(path), "pairs": 400, "reused": True, "seconds": dpo["reference"]["seconds"]}
    (resume,) = dpo["resumes"]
    assert (resume["mode"], resume["tag"], resume["world_size"]) == ("universal", "step6", 1) and dpo["stage_steps"] == 24


def test_held_out_reward_accuracy_climbs_and_every_metric_has_trls_name(runs: Runs):
    rows = metric_rows(runs.a / "phases" / "01-dpo")
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    assert [r["stage_step"] for r in evals] == [0, 8, 16, 24]
    assert evals[0]["eval/rewards/accuracies"] <= 0.6 and evals[0]["eval/rewards/margins"] == pytest.approx(0, abs=1e-4), "policy = reference"
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9 and evals[-1]["eval/rewards/margins"] > evals[1]["eval/rewards/margins"] > 0
    assert sorted(r["stage_step"] for r in rows if r["stage_step"] > 0) == list(range(1, 25)), "each step once, across the resume"
    assert all(f"train/{key}" in r for r in rows if r["stage_step"] > 0 for key in REWARD_KEYS)
    final = manifests(runs.a)[1]["eval"]
    assert {f"eval/{key}" for key in REWARD_KEYS} <= set(final) and "eval/ppl" not in final and final["eval/loss"] == final["eval/pref_loss"]
    logged = [row for run in offline_runs(runs.a / "wandb") if run.name == "dpo" for row in run.history]
    assert any("train/rewards/accuracies" in row for row in logged) and any("eval/rewards/margins" in row for row in logged)


def test_the_reference_of_two_zero3_ranks_equals_one_zero0_rank(runs: Runs):
    (zero3,), (zero0,) = reference_files(runs.folder / "cache"), reference_files(runs.folder / "cache-z0")
    assert zero3.name == zero0.name, "the same start weights, seq_len and precision"
    a, b = np.load(zero3), np.load(zero0)
    assert a.shape == (400, 2) and (a < 0).all() and np.abs(a - b).max() <= TOLERANCE, np.abs(a - b).max()


def test_a_second_phase_with_the_same_data_and_start_reuses_the_reference(runs: Runs):
    (b,), (c,) = manifests(runs.b), manifests(runs.c)
    assert b["reference"]["reused"] is False and c["reference"]["reused"] is True and c["reference"]["file"] == b["reference"]["file"]
    assert b["batch"]["chosen_by"] == c["batch"]["chosen_by"] == "probe" and b["batch"]["micro_batch"] == c["batch"]["micro_batch"]
    first_b, first_c = (metric_rows(run / "phases" / "00-dpo0")[0] for run in (runs.b, runs.c))
    assert first_c["train/loss"] == first_b["train/loss"] and first_c["train/rewards/margins"] == first_b["train/rewards/margins"]


def test_report_and_compare_show_reward_accuracy_and_margin(runs: Runs, tmp_path):
    table = {row["stage"]: row for row in report_table(load_run(runs.a))}
    assert table["dpo"]["rewards/accuracies"] >= 0.9 and table["dpo"]["start_rewards/accuracies"] <= 0.6 and table["sft"]["rewards/margins"] is None
    compare_runs([runs.a, runs.b], tmp_path / "compare.png")
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [row["run"] for row in rows] == ["a", "b"] and all("rewards/accuracies" in row and "rewards/margins" in row for row in rows)
