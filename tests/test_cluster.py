"""Multi-node for real, on loopback: DeepSpeed's pdsh launcher over a local sshd, and
`harness submit` on a local 2-node SLURM cluster (slurm/local-cluster.sh): afterok chains,
preemption with requeue and resume, a failing stage, and Ctrl-C that ends exactly our ranks."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from cluster import job_field, local_cluster, sbatch, scancel, wait_job  # noqa: F401  (fixture)
from conftest import DATA, REPO, finetune_phase, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from test_adapter_run import assert_merged_is_base_plus_scaled_b_times_a
from test_multistep import alive
from test_resume import wait_for

from harness.records import RunDir, StageDir
from harness.launch.slurm import recorded_jobs


def two_node_plan(name: str, launcher: str, port: int, phases: list[dict], hosts: list[str], transitions: str = "swap") -> dict:
    plan = make_plan(name, phases, port=port, procs=1)
    plan["cluster"].update({"launcher": launcher, "nodes": 2, "transitions": transitions})
    if launcher == "pdsh":
        plan["cluster"]["hosts"] = hosts
    plan["slurm"] = {"time": "00:15:00", "preempt_grace_s": 30}
    return plan


def three_stages() -> list[dict]:
    """pre, a LoRA sft (its ZeRO-3 handoff gathers and merges across the two nodes), then dpo from
    the merged model: the dpo ranks, on two nodes, share its reference pass and gather it."""
    dpo = {"name": "dpo", "kind": "preference", "data": {"files": [str(DATA / "cipher_pairs.jsonl")]}, "steps": 3, "zero_stage": 3,
           "seq_len": 24, "task_metrics": []}
    lora = {"adapter": {"r": 4, "alpha": 8, "targets": ["all-linear"], "modules_to_save": []}}
    return [pretrain_phase("pre", steps=4, zero_stage=2), finetune_phase("sft", steps=4, zero_stage=3, trainable=lora), dpo]


def check_sft_and_dpo(out: Path) -> None:
    """The LoRA sft started from pre's handoff, left the base as it was and handed over W + 2·B·A;
    the dpo stage computed its reference (its plan has a token cache of its own) from that."""
    pre, sft, dpo = manifests(out)
    assert sft["start_weights_digest"] == pre["weights_digest"] and sft["load"]["mode"] == "weights_only" and sft["global_step_end"] == 8
    assert sft["trainable"]["frozen_digest_start"] == sft["trainable"]["frozen_digest_end"]
    assert len(assert_merged_is_base_plus_scaled_b_times_a(out, "01-sft", "00-pre", 8 / 4)) == 14
    assert dpo["start_weights_digest"] == sft["weights_digest"] and dpo["global_step_end"] == 11
    assert (dpo["reference"]["pairs"], dpo["reference"]["reused"]) == (400, False) and "eval/rewards/accuracies" in dpo["eval"]


def submitted_jobs(out: Path) -> list[str]:
    return [job.job_id for job in recorded_jobs(RunDir(out))]


def rank_records(stage_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (stage_dir / "ranks").glob("rank*.json")), key=lambda r: r["rank"])


def test_pdsh_launch_runs_one_rank_on_each_node(local_cluster, tmp_path):
    plan = two_node_plan("pdsh", "pdsh", 29710, three_stages(), local_cluster.hosts)
    plan["cache_dir"] = str(tmp_path / "cache")
    out = tmp_path / "run"
    harness("run", write_plan(tmp_path, plan), "--out", out, check=True, env=local_cluster.env())
    check_sft_and_dpo(out)
    for stage_dir in sorted((out / "phases").iterdir()):
        ranks = rank_records(stage_dir)
        assert [(r["rank"], r["node_rank"], r["address"]) for r in ranks] == [(0, 0, "127.0.0.1"), (1, 1, "127.0.0.2")]
        env_file = StageDir(stage_dir).deepspeed_env.read_text()
        assert "DS_ACCELERATOR=cpu" in env_file and "\n\n" not in env_file


def test_submit_runs_the_afterok_chain_on_two_slurm_nodes(local_cluster, tmp_path):
    env = local_cluster.env()
    plan = two_node_plan("chain", "slurm", 29720, three_stages(), local_cluster.hosts, transitions="relaunch")
    plan["cache_dir"] = str(tmp_path / "cache")
    out = tmp_path / "run"
    harness("submit", write_plan(tmp_path, plan), "--out", out, check=True, env=env)
    first, second, third = submitted_jobs(out)
    assert job_field(second, "Dependency", env=env).startswith(f"afterok:{first}")
    assert job_field(third, "Dependency", env=env).startswith(f"afterok:{second}")
    for job in (first, second, third):
        assert wait_job(job, 240, env=env) == "COMPLETED"
    assert job_field(second, "StartTime", env=env) >= job_field(first, "EndTime", env=env)
    check_sft_and_dpo(out)
    for stage_dir in sorted((out / "phases").iterdir()):
        assert [r["slurm_node"] for r in rank_records(stage_dir)] == ["n1", "n2"]
    status = harness("status", out, check=True, env=env).stdout
    assert status.count("COMPLETED") == 3 and status.count("done") == 3


def test_preempted_stage_checkpoints_requeues_and_resumes(local_cluster, tmp_path):
    """Both stages share one launch, so one job (swap); USR1 during the first stage: the ranks
    checkpoint, the job requeues itself, and the rerun resumes the stage and runs the next one."""
    env = local_cluster.env()
    steps = 300
    # keep_checkpoints: every tag stays, so the preemption's own checkpoint can be seen afterwards.
    long_phase = pretrain_phase("long", steps=steps, checkpoint_every=10, keep_checkpoints=steps)
    plan = two_node_plan("preempt", "slurm", 29730, [long_phase, finetune_phase("next", steps=4)], local_cluster.hosts)
    out = tmp_path / "run"
    harness("submit", write_plan(tmp_path, plan), "--out", out, check=True, env=env)
    (job,) = submitted_jobs(out)
    assert recorded_jobs(RunDir(out))[0].stages == [0, 1], "one job for the launch both stages share"
    stage = out / "phases" / "00-long"
    wait_for(lambda: (stage / "checkpoints" / "latest").exists(), 240, "a first checkpoint")
    scancel("--signal=USR1", "--batch", job, env=env)

    assert wait_job(job, 300, env=env) == "COMPLETED"
    assert job_field(job, "Restarts", env=env) == "1"
    log = next((out / "slurm").glob("00-01-*.out")).read_text()
    assert "[sbatch] requeue" in log and "exit code 75" in log
    long, after = manifests(out)
    assert long["stage_steps"] == steps and after["global_step_end"] == steps + 4
    assert after["start_weights_digest"] == long["weights_digest"]
    assert [r["stage_step"] for r in metric_rows(stage)] == list(range(1, steps + 1)), "no step lost or repeated"
    tags = sorted(int(p.name.removeprefix("step")) for p in (stage / "checkpoints").glob("step*"))
    assert any(t % 10 for t in tags), "the preemption saved a checkpoint off the regular interval"
    status = harness("status", out, check=True, env=env).stdout
    assert status.count("COMPLETED") == 2, "status shows the job's state on both its stages"


def test_failing_stage_cancels_its_dependants_and_status_says_so(local_cluster, tmp_path):
    env = {**local_cluster.env(), "HARNESS_FAULT": "sft:step2:1"}  # rank 1 of the first job's stage dies (sbatch passes the environment)
    phases = [finetune_phase("sft", steps=3), pretrain_phase("later", steps=3)]
    out = tmp_path / "run"
    plan = two_node_plan("fails", "slurm", 29740, phases, local_cluster.hosts, transitions="relaunch")
    harness("submit", write_plan(tmp_path, plan), "--out", out, check=True, env=env)
    first, second = submitted_jobs(out)
    assert wait_job(first, 240, env=env) == "FAILED"
    assert wait_job(second, 60, env=env) == "CANCELLED"
    assert job_field(second, "Reason", env=env) == "DependencyNeverSatisfied"
    assert not (out / "phases" / "01-later" / "ranks").exists(), "the dependant never ran"
    status = harness("status", out, check=True, env=env).stdout
    assert "FAILED" in status and "CANCELLED (DependencyNeverSatisfied)" in status


def test_ctrl_c_on_a_multinode_run_ends_every_rank_and_only_them(local_cluster, tmp_path):
    plan = two_node_plan("ctrlc", "pdsh", 29750, [pretrain_phase("long", steps=2000, checkpoint_every=10)], local_cluster.hosts)
    out = tmp_path / "run"
    stage = out / "phases" / "00-long"
    # Looks like our ranks to `pkill -f` (DeepSpeed's pdsh runner cleanup): must survive.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m", "harness.worker", "--stage", str(stage / "stage.json")])
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", write_plan(tmp_path, plan), "--out", out],
                           cwd=REPO, env=local_cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (stage / "checkpoints" / "latest").exists(), 240, "a first checkpoint")
        ranks = rank_records(stage)
        pids = [pid for r in ranks for pid in (r["pid"], r["launcher_pid"])]
        assert len(ranks) == 2 and all(alive(pid) for pid in pids)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=90)
        assert run.returncode == 130, stderr
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, "every rank and per-node launcher to end")
        assert alive(decoy.pid)
    finally:
        decoy.kill()
        decoy.wait()
        run.kill()


def test_a_stopped_rank_on_the_second_node_is_named_and_every_node_ended(local_cluster, tmp_path):
    plan = two_node_plan("hang", "pdsh", 29760, [pretrain_phase("long", steps=2000, checkpoint_every=10, hang_timeout=10)], local_cluster.hosts)
    out = tmp_path / "run"
    stage = StageDir(out / "phases" / "00-long")
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", write_plan(tmp_path, plan), "--out", out],
                           cwd=REPO, env=local_cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stage.metrics.exists() and len(stage.metrics.read_text().splitlines()) >= 5, 240, "5 steps logged")
        ranks = rank_records(stage.root)
        pids = [pid for r in ranks for pid in (r["pid"], r["launcher_pid"])]
        assert [r["node_rank"] for r in ranks] == [0, 1]
        os.kill(ranks[1]["pid"], signal.SIGSTOP)
        _, stderr = run.communicate(timeout=10 + 60 + 30)
        assert run.returncode == 1, stderr[-3000:]
        assert re.search(r"hung: no progress for \d+ s \(allowed (10|60) s\); rank 1 on \S+ is stuck, its heartbeat stopped", stderr), stderr
        assert re.search(r"rank 1 \(\S+, stuck, .*\); stack \(py-spy dump\) in " + re.escape(str(stage.rank_log(1))), stderr), stderr
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, "every rank and per-node launcher of both nodes to end")
    finally:
        for pid in (r["pid"] for r in rank_records(stage.root)) if stage.ranks.exists() else ():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        run.kill()


def test_the_tokenize_job_array_builds_a_store_in_parts_and_joins_it(local_cluster, tmp_path):
    env = local_cluster.env()
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(f"Paragraph {i}: ".encode() + b"the fox and the dog. " * (i % 40 + 1) + b"\n\n" for i in range(8000)))
    plan = two_node_plan("tok", "slurm", 30320, [pretrain_phase("pre", steps=2, data={"files": [str(corpus)]})], local_cluster.hosts)
    plan["cache_dir"] = str(tmp_path / "cache")
    out = tmp_path / "run"
    harness("submit", write_plan(tmp_path, plan), "--out", out, "--dry-run", "--tokenize-parts", "2", check=True, env=env)
    job = sbatch(str(out / "slurm" / "tokenize.sbatch"), cwd=tmp_path, env=env)
    assert [wait_job(f"{job}_{task}", 180, env=env) for task in (1, 2)] == ["COMPLETED", "COMPLETED"]
    logs = [next((out / "slurm").glob(f"tokenize-{job}-{task}.out")).read_text() for task in (1, 2)]
    assert all(f"part {task}/2" in log for task, log in zip((1, 2), logs))
    assert sum("tokens in" in log for log in logs) == 1, "the task that found every piece there joined the store"
    (store,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    meta = json.loads((store / "meta.json").read_text())
    assert meta["pieces"] >= 3 and meta["tokens"] == corpus.stat().st_size - meta["rows"], "every piece once"
