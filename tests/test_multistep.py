"""The multistep phase for real: stages with their own optimizers, weights and data position
carried across them, Ctrl-C in the middle of a cycle, resume at the right stage and step,
and L1/L2 penalties that are exact under ZeRO-0 and ZeRO-3."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.records import StageDir

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, REPO, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from test_resume import wait_for

LONG = 80  # steps of the stage that gets interrupted


def multistep_phase(**settings) -> dict:
    return {
        "name": "ms", "kind": "multistep", "cycles": 2, "zero_stage": 2, "seq_len": 48,
        "data": {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}, "mix": "alternate"},
        "scheduler": {"type": "WarmupCosineLR", "span": "phase"},
        "stages": [
            {"optimizer": {"type": "SGD", "lr": 0.05}, "steps": 3, "data": "pretrain"},
            {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}, "steps": 3, "data": "finetune"},
            {"optimizer": {"type": "AdamW", "lr": 2e-3}, "steps": LONG, "checkpoint_every": 5},
        ],
        **settings,
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """Run pre -> ms (2 cycles x 3 stages); Ctrl-C during ms.c1.s3-adamw; rerun to the end."""
    folder = tmp_path_factory.mktemp("multistep")
    plan_path = write_plan(folder, make_plan("ms", [pretrain_phase("pre", steps=3), multistep_phase()], port=29660))
    out = folder / "run"
    victim = out / "phases" / "03-ms.c1.s3-adamw"
    # A process whose command line looks like our ranks': DeepSpeed's own cleanup (pkill -f) would kill it.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m", "harness.worker", "--stage", str(victim / "stage.json")])
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", plan_path, "--out", out], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once a first checkpoint is complete, interrupt as soon as DeepSpeed names the next one
        # `latest`: it does so before every rank has written its shard, the race that a resume must
        # survive (from the complete one, or from the next if its save finished first).
        first = wait_for(lambda: StageDir(victim).latest_checkpoint(), 240, "a complete checkpoint of ms.c1.s3-adamw")
        latest = victim / "checkpoints" / "latest"
        wait_for(lambda: latest.exists() and latest.read_text().strip() not in ("", first), 240, f"a checkpoint of ms.c1.s3-adamw after {first}")
        rank_pids = [json.loads(p.read_text())["pid"] for p in (victim / "ranks").glob("rank*.json")]
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        interrupted = {"exit": run.returncode, "stderr": stderr, "ranks": rank_pids,
                       "ranks_alive": [alive(pid) for pid in rank_pids], "decoy_alive": alive(decoy.pid),
                       "checkpoint": StageDir(victim).latest_checkpoint(), "metrics": (victim / "metrics.jsonl").read_text()}
    finally:
        decoy.kill()
        decoy.wait()
    interrupted["rerun"] = harness("run", plan_path, "--out", out, check=True).stdout
    return out, interrupted


def test_ctrl_c_stops_every_rank_and_nothing_else(interrupted_run):
    _, interrupted = interrupted_run
    assert interrupted["exit"] == 130 and "interrupted" in interrupted["stderr"]
    assert len(interrupted["ranks"]) == 2 and interrupted["ranks_alive"] == [False, False]
    assert interrupted["decoy_alive"], "a process the harness did not start must survive"


def test_multistep_expands_into_named_stages_with_their_own_optimizers(interrupted_run):
    out, _ = interrupted_run
    records = manifests(out)
    assert [m["stage"] for m in records] == ["pre", "ms.c1.s1-sgd", "ms.c1.s2-sgd-momentum", "ms.c1.s3-adamw",
                                             "ms.c2.s1-sgd", "ms.c2.s2-sgd-momentum", "ms.c2.s3-adamw"]
    assert [m["engine_optimizer"] for m in records] == ["AdamW", "SGD", "SGD", "AdamW", "SGD", "SGD", "AdamW"]
    configs = [json.loads((d / "ds_config.json").read_text())["optimizer"] for d in sorted((out / "phases").iterdir())]
    assert configs[2]["params"]["momentum"] == 0.9 and "momentum" not in configs[1]["params"]


def test_weights_carry_across_optimizer_changes_and_modes_follow_the_rule(interrupted_run):
    out, _ = interrupted_run
    records = manifests(out)
    for before, after in zip(records, records[1:]):
        assert after["start_weights_digest"] == before["weights_digest"]
    modes = [m["load"]["mode"] for m in records]
    assert modes == ["init", "weights_only", "full_state", "weights_only", "weights_only", "full_state", "weights_only"]
    assert "optimizer changed (SGD -> AdamW)" in records[3]["load"]["reason"]


def test_interrupted_stage_resumed_at_its_checkpoint_and_step(interrupted_run):
    out, interrupted = interrupted_run
    victim = out / "phases" / "03-ms.c1.s3-adamw"
    tag = interrupted["checkpoint"]
    assert tag is not None, "the interrupt came after a complete checkpoint"
    tag_step = int(tag.removeprefix("step"))
    assert 5 <= tag_step < LONG
    assert f"stage ms.c1.s3-adamw: resuming from checkpoint {tag} (native" in interrupted["rerun"]
    manifest = manifests(out)[3]
    assert [(r["mode"], r["tag"], r["stage_step"]) for r in manifest["resumes"]] == [("native", tag, tag_step)]
    # The rows up to the checkpoint are those the first attempt wrote (a restart from step 1 would
    # write them again, with other timings): the first step logged after the resume is tag_step + 1.
    before = [line for line in interrupted["metrics"].splitlines() if line.strip()]
    after = (victim / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["stage_step"] for line in before[:tag_step]] == list(range(1, tag_step + 1))
    assert after[:tag_step] == before[:tag_step], "rows up to the checkpoint kept as the first attempt logged them"
    assert [r["stage_step"] for r in metric_rows(victim)] == list(range(1, LONG + 1))
    assert manifest["stage_steps"] == LONG


def test_data_position_carries_so_cycles_see_new_samples(interrupted_run):
    out, _ = interrupted_run
    records = manifests(out)
    pretrain_key = next(k for k in records[0]["data_position"] if k.startswith("pretrain"))
    # pre: 3 steps; c1.s1: 3 pretrain steps; c1.s3: 80 alternating steps, 40 of them pretrain (but pre's seq_len is 64,
    # the multistep phase's 48: another stream); global batch 8.
    ms_pretrain = [k for k in records[-1]["data_position"] if k.startswith("pretrain") and k != pretrain_key]
    assert len(ms_pretrain) == 1
    positions = [m["data_position"].get(ms_pretrain[0], 0) for m in records]
    assert positions == [0, 24, 24, 24 + 40 * 8, 48 + 40 * 8, 48 + 40 * 8, 48 + 80 * 8]


def test_global_step_continues_and_cosine_spans_the_phase(interrupted_run):
    out, _ = interrupted_run
    rows = [r for d in sorted((out / "phases").iterdir()) for r in metric_rows(d)]
    assert [r["global_step"] for r in rows] == list(range(1, len(rows) + 1))
    sgd_lrs = [r["train/lr"] for r in rows if r["stage"] in ("ms.c1.s1-sgd", "ms.c1.s2-sgd-momentum", "ms.c2.s1-sgd")]
    assert sgd_lrs == sorted(sgd_lrs, reverse=True) and sgd_lrs[0] == pytest.approx(0.05)


def test_every_stage_is_evaluated_on_both_data_sets(interrupted_run):
    out, _ = interrupted_run
    for m in manifests(out)[1:]:
        assert {"eval/lm_loss", "eval/lm_ppl", "eval/sft_loss", "eval/exact_match", "eval/loss"} <= set(m["eval"])
        assert 0.0 <= m["eval"]["eval/exact_match"] <= 1.0


def test_report_table_matches_the_manifests(interrupted_run):
    out, _ = interrupted_run
    result = harness("report", out, check=True)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in table] == [m["stage"] for m in manifests(out)]
    for row, m in zip(table, manifests(out)):
        assert row["eval_loss"] == pytest.approx(m["eval"]["eval/loss"])
        assert row["optimizer"] == m["engine"]["optimizer"] and row["load"] == m["load"]["mode"]
    assert "ms.c2.s3-adamw" in result.stdout


# ---- L1 / L2 -------------------------------------------------------------------------------

L1, L2 = 1e-3, 1.0


def penalised_run(folder: Path, zero_stage: int, port: int) -> Path:
    phase = pretrain_phase("pen", steps=4, zero_stage=zero_stage, optimizer={"type": "SGD", "lr": 0.05},
                           scheduler={"type": "none"}, grad_clip=0.0, regularization={"l1": L1, "l2": L2})
    out = folder / f"zero{zero_stage}"
    harness("run", write_plan(folder, make_plan("pen", [phase], port=port), f"zero{zero_stage}.yaml"), "--out", out, check=True)
    return out


@pytest.fixture(scope="module")
def penalised(tmp_path_factory):
    folder = tmp_path_factory.mktemp("penalty")
    return {zero: penalised_run(folder, zero, 29670 + zero) for zero in (0, 3)}


def hand_penalty(model_dir: Path) -> tuple[float, float]:
    weights = [w for w in load_file(str(model_dir / "model.safetensors")).values() if w.dim() >= 2]
    return L1 * sum(w.abs().sum().item() for w in weights), L2 * sum(w.pow(2).sum().item() for w in weights)


@pytest.mark.parametrize("zero", [0, 3])
def test_penalty_values_match_a_hand_computation_on_the_full_weights(penalised, zero):
    out = penalised[zero]
    (manifest,) = manifests(out)
    l1, l2 = hand_penalty(out / "phases" / "00-pen" / "model")
    assert manifest["regularization"]["train/l1_penalty"] == pytest.approx(l1, rel=1e-5)
    assert manifest["regularization"]["train/l2_penalty"] == pytest.approx(l2, rel=1e-5)


def test_penalty_gradient_is_the_same_under_zero_0_and_zero_3(penalised):
    zero0 = load_file(str(penalised[0] / "phases" / "00-pen" / "model" / "model.safetensors"))
    zero3 = load_file(str(penalised[3] / "phases" / "00-pen" / "model" / "model.safetensors"))
    for name in zero0:
        torch.testing.assert_close(zero3[name], zero0[name], rtol=1e-4, atol=1e-6)
    rows = metric_rows(penalised[3] / "phases" / "00-pen")
    # Without clipping, 3 updates with gradient 2w and lr 0.05 scale the weights by 0.9 each: 0.9^6 = 0.53 on sum w^2.
    assert rows[-1]["train/l2_penalty"] < 0.6 * rows[0]["train/l2_penalty"], "an L2 of 1.0 visibly shrinks the weights"
