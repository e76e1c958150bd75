"""What goes wrong in real launches, with real ranks on CPU: four runs started together on one
machine (each launch reserves its own port); a tokenizer longer than the model's embeddings,
resized; a rank that stops (SIGSTOP) found by its heartbeat, named with its stack, the launch
ended and the rerun finishing with the uninterrupted run's weights; a disk that fills up (a small
tmpfs); a loss that goes NaN. And what the user sees while and after it runs: tokens/s and ETAs
per step, `harness status` with the running stage's ETA, `harness report` with a line per data set.

The four runs of `four_runs` run once per module; "ref" among them is the uninterrupted run the
hang and the full disk are compared with."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, REPO, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from harness.cli import main
from harness.launch.failures import explain_exit
from harness.launch.setup import validated_stages
from harness.plan import BUILTIN_CONFIGS
from harness.records import CHECKPOINT_COMPLETE, CheckpointRecord, RankRecord, StageDir, is_done
from harness.views.report import load_run, report_figure

PORT = 30200  # every run here starts from it: the launches must each find their own
STEPS, EVERY = 60, 20


def ref_plan(name: str, **settings) -> dict:
    """Pretrain 60 steps (checkpoints at 20 and 40), then a multistep stage alternating pretrain and fine-tune batches."""
    mix = {"name": "mix", "kind": "multistep", "cycles": 1, "seq_len": 48, "task_metrics": [],
           "data": {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}, "mix": "alternate"},
           "stages": [{"steps": 4}]}
    return make_plan(name, [pretrain_phase("pre", steps=STEPS, checkpoint_every=EVERY, **settings), mix], port=PORT)


def model_with_offset_embeddings(folder: Path, vocab: int) -> Path:
    """A tiny Llama with `vocab` embedding rows, all near 0.5: rows added around their mean stay near 0.5."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **BUILTIN_CONFIGS["tiny-llama"]))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)
    model.save_pretrained(folder)
    return folder


def start(plan_path: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(plan_path), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(predicate, run: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if predicate():
            return
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    raise AssertionError(f"no {what}; the run: {run.communicate(timeout=120)}")


def logged_steps(stage_dir: Path) -> int:
    try:
        return len((stage_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def weights(out: Path) -> list[str]:
    return [m["weights_digest"] for m in manifests(out)]


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Four `harness run`s started at the same moment, every plan's master_port the same: the
    reference (2 ranks, 2 stages in one launch), the same plan again, a model whose tokenizer is
    longer than its embeddings (resized, 2 ranks), and a 1-rank run."""
    folder = tmp_path_factory.mktemp("four")
    model = {"path": str(model_with_offset_embeddings(folder / "model", vocab=200)), "tokenizer": "bytes", "resize_embeddings": True}
    plans = {
        "ref": ref_plan("ref"),
        "ref-again": ref_plan("ref"),
        "resized": make_plan("resized", [pretrain_phase("pre", steps=2)], port=PORT, model=model),
        "one-rank": make_plan("one", [pretrain_phase("pre", steps=3)], port=PORT, procs=1),
    }
    runs = {name: (folder / name / "run", start(write_plan(folder / name, plan), folder / name / "run")) for name, plan in plans.items()}
    done = {}
    for name, (out, run) in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        done[name] = (out, subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
    return done


def test_four_runs_started_together_on_one_machine_all_finish(four_runs):
    for name, (out, result) in four_runs.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    ports = [re.search(r"--master_port (\d+)", (out / "phases" / "00-pre" / "command.txt").read_text())[1] for out, _ in four_runs.values()]
    assert len(set(ports)) == 4, f"each launch reserved a port of its own: {ports}"
    assert weights(four_runs["ref"][0]) == weights(four_runs["ref-again"][0]), "runs side by side do not disturb each other"


def test_a_longer_tokenizer_gets_mean_resized_embeddings_recorded_in_the_manifest(four_runs):
    out, _ = four_runs["resized"]
    (manifest,) = manifests(out)
    assert manifest["embedding_resize"] == {"rows_before": 200, "rows_after": 259, "init": "mean"}
    model = out / "phases" / "00-pre" / "model"
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 259
    embeddings = load_file(model / "model.safetensors")["model.embed_tokens.weight"]
    old, new = embeddings[:200], embeddings[200:]
    assert embeddings.shape == (259, 64)
    assert abs(new.mean() - old.mean()) < 0.02 and new.mean() > 0.4, "new rows drawn around the old rows' mean (about 0.5), not from zero"


def test_every_step_reports_tokens_per_s_and_the_stage_and_plan_eta(four_runs):
    out, _ = four_runs["ref"]
    pre, mix = (metric_rows(out / "phases" / name) for name in ("00-pre", "01-mix.c1.s1-adamw"))
    assert all(row["train/tokens_per_s"] > 0 for row in pre + mix)
    assert all(row["train/eta_plan_s"] > row["train/eta_stage_s"] for row in pre), "the plan's ETA adds the later stage's 4 steps"
    assert [row["train/eta_stage_s"] == row["train/eta_plan_s"] for row in mix] == [True] * 4, "no stage after the last one"
    assert pre[-1]["train/eta_stage_s"] == 0 and mix[-1]["train/eta_plan_s"] == 0
    # Both ETAs are one measured step time times the steps left: the stage's, and with the next stage's 4.
    assert all(row["train/eta_plan_s"] * (STEPS - row["stage_step"]) == pytest.approx(row["train/eta_stage_s"] * (STEPS - row["stage_step"] + 4))
               for row in pre)
    assert not any("train/mfu" in row for row in pre + mix), "no MFU on CPU: no peak to compare with"
    bar = [line for line in (out / "phases" / "00-pre" / "launcher.log").read_text().split("\r") if "60/60" in line][-1]
    assert re.search(r"tok/s, eta 0s, plan \d+s\]", bar), bar


def test_report_draws_a_line_per_data_set_and_names_the_plan(four_runs, capsys):
    out, _ = four_runs["ref"]
    assert main(["report", str(out)]) == 0
    assert f"plan 'ref' ({out})" in capsys.readouterr().out
    run = load_run(out)
    lines = run.stages[1].train_lines()
    assert {data: [step for step, _ in points] for data, points in lines.items()} == {"pretrain": [61, 63], "finetune": [62, 64]}
    figure = report_figure(run)
    assert figure._suptitle.get_text() == f"plan 'ref' ({out})"
    loss = figure.axes[0]
    drawn = [line for line in loss.lines if len(set(line.get_xdata())) > 1 and min(line.get_xdata()) > STEPS]  # not the boundary's
    assert sorted(line.get_linestyle() for line in drawn) == ["-", "--"], "the multistep stage: one line per data set, not one sawtooth"


@pytest.mark.slow  # about 40 s: the hang must be waited for, then the rerun
def test_a_stopped_rank_is_found_named_and_ended_and_the_rerun_finishes_as_uninterrupted(four_runs, tmp_path: Path, capsys):
    plan_path, out = write_plan(tmp_path, ref_plan("ref", hang_timeout=10)), tmp_path / "run"
    stage = StageDir(out / "phases" / "00-pre")
    run = start(plan_path, out)
    wait_until(lambda: logged_steps(stage.root) >= 5, run, 300, "5 steps logged")
    rank1 = RankRecord.read(stage.rank_record(1))
    os.kill(rank1.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        time.sleep(2)
        assert main(["status", str(out)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if "pre" in line and "running" in line)
        assert re.search(r"\d+s \(plan", row), row
        stdout, stderr = run.communicate(timeout=10 + 60 + 30)
        took = time.monotonic() - stopped_at
        left = [record.pid for record in (RankRecord.read(stage.rank_record(r)) for r in (0, 1)) if running(record.pid)]
    finally:
        if run.poll() is None:
            run.kill()
        if running(rank1.pid):
            os.kill(rank1.pid, signal.SIGKILL)
    assert run.returncode == 1 and took <= 10 + 60, (took, stderr[-3000:])
    assert re.search(r"hung: no progress for \d+ s \(allowed (10|60) s\); rank 1 on " + socket.gethostname() + " is stuck, its heartbeat stopped",
                     stderr), stderr
    assert re.search(r"rank 1 \(\S+, stuck, last seen in [a-z ]+ at step \d+, not running\); stack \(py-spy dump\) in " +
                     re.escape(str(stage.rank_log(1))) + r":\n      \S+ \(\S+\.py:\d+\)", stderr), stderr  # a frame: 'step (harness/worker/train.py:120)'
    assert re.search(r"rank 0 \(\S+, waiting, .*running\); stack", stderr), stderr
    assert "rerun the same command to" in stderr and "rank 1's stack (py-spy dump" in stage.rank_log(1).read_text()
    assert left == [], "the harness ended every rank of the hung launch, the stopped one too"

    rerun = harness("run", plan_path, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert weights(out) == weights(four_runs["ref"][0])


def checkpoint_bytes(stage: StageDir) -> int:
    """The bytes of one of the stage's checkpoint tags (its last), as its marker lists them."""
    return sum(check.bytes for check in CheckpointRecord.read(stage.checkpoints / f"step{STEPS}" / CHECKPOINT_COMPLETE).files.values())


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mounted for the test (CI runs as root); skipped where mounting one is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): the full-disk case needs one")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_stops_the_save_naming_the_folder_and_the_rerun_resumes_from_the_intact_checkpoint(four_runs, small_disk: Path):
    ref = StageDir(four_runs["ref"][0] / "phases" / "00-pre")
    tag_bytes = checkpoint_bytes(ref)
    # Room for the step-20 checkpoint and the run's other files, half a checkpoint short at step 40.
    size = 4096 * ((3 * tag_bytes // 2 + (512 << 10)) // 4096)
    subprocess.run(["mount", "-o", f"remount,size={size}", str(small_disk)], check=True)
    plan_path, out = write_plan(small_disk, ref_plan("ref")), small_disk / "run"
    stage = StageDir(out / "phases" / "00-pre")

    failed = harness("run", plan_path, "--out", out)

    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"the disk is full (ENOSPC, or the quota: EDQUOT) writing checkpoint step40 into {stage.checkpoints / 'step40'}: about " in failed.stderr
    assert re.search(r"about [\d.]+ MB needed, [\d.]+ MB free there", failed.stderr), failed.stderr
    assert stage.checkpoint_tags() == ["step20"] and not (stage.checkpoints / "step40" / CHECKPOINT_COMPLETE).exists()
    assert not is_done(stage) and "resumes from its newest intact checkpoint (step20)" in failed.stderr

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # space made
    rerun = harness("run", plan_path, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage pre: resuming from checkpoint step20" in rerun.stdout
    assert weights(out) == weights(four_runs["ref"][0])


def test_a_full_disk_at_the_handoff_counts_no_handoff_and_the_rerun_writes_it(four_runs, small_disk: Path):
    ref = StageDir(four_runs["ref"][0] / "phases" / "00-pre")
    tag_bytes = checkpoint_bytes(ref)
    model_bytes = sum(p.stat().st_size for p in ref.model.iterdir())
    # Every tag kept: room for the three checkpoints and the run's other files, half the handoff model short.
    size = 4096 * ((3 * tag_bytes + (256 << 10) + model_bytes // 2) // 4096)
    subprocess.run(["mount", "-o", f"remount,size={size}", str(small_disk)], check=True)
    plan_path, out = write_plan(small_disk, ref_plan("ref", keep_checkpoints=3)), small_disk / "run"
    stage = StageDir(out / "phases" / "00-pre")

    failed = harness("run", plan_path, "--out", out)

    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"the disk is full (ENOSPC, or the quota: EDQUOT) writing the handoff model into {stage.model}: about " in failed.stderr
    assert stage.checkpoint_tags() == ["step60", "step40", "step20"] and not is_done(stage), "no handoff counted done"
    assert "resumes from its newest intact checkpoint (step60)" in failed.stderr

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # space made
    rerun = harness("run", plan_path, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage pre: resuming from checkpoint step60" in rerun.stdout
    assert weights(out) == weights(four_runs["ref"][0])


def test_a_loss_that_stays_nan_stops_the_stage_without_saving_that_state(tmp_path: Path):
    plan = make_plan("nan", [pretrain_phase("pre", steps=6, checkpoint_every=1, optimizer={"type": "AdamW", "lr": 1e30},
                                            scheduler={"type": "none"})], port=PORT)
    out = tmp_path / "run"
    stage = StageDir(out / "phases" / "00-pre")

    result = harness("run", write_plan(tmp_path, plan), "--out", out)

    assert result.returncode == 1, result.stderr[-3000:]
    first = metric_rows(stage.root)[0]["train/loss"]
    assert (f"the training loss was not finite (nan, nan, nan) at steps 2-4, stopped at step 4 (nonfinite_steps: 3); "
            f"the last finite loss was {first:.4g} at step 1; no checkpoint of a non-finite state was saved") in result.stderr
    assert "a rerun resumes from its newest checkpoint, step1" in result.stderr
    assert stage.checkpoint_tags() == ["step1"] and not stage.manifest.exists()
    assert [row["stage_step"] for row in metric_rows(stage.root)] == [1, 2, 3, 4]


def test_a_port_taken_by_another_program_is_named_as_a_port_conflict(tmp_path: Path):
    stage_dir = StageDir(tmp_path / "00-pre")
    stage_dir.ranks.mkdir(parents=True)
    stage_dir.launcher_log.write_text("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
                                      "port: 30201, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use\n")
    _, stages, _ = validated_stages(write_plan(tmp_path, make_plan("port", [pretrain_phase("pre")], port=PORT)))

    detail, advice = explain_exit(stages[0], stage_dir, 1)

    assert detail.startswith("a port conflict: another program took port 30201 before the ranks could listen on it (EADDRINUSE")
    assert "cluster.master_port" in advice and "rerun" not in detail + advice

