"""An interrupted stage continues whatever the rerun changed, or is refused before launch:
another world size reshards its checkpoint (universal), other engine settings continue from
its fp32 weights with a fresh optimizer (consolidated), a changed model or a shrunk stage is
refused (exit 2). Damaged checkpoints are found by checksum and set aside, never deleted."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import cli, harness, make_plan, metric_rows, pretrain_phase, write_plan
from harness.records import StageDir
from harness.records import CheckpointRecord, Manifest
from harness.stages import StageFile

pytestmark = pytest.mark.slow  # several DeepSpeed launches per test: left out of the developer loop

STEPS, GLOBAL_BATCH = 10, 8


def fp32_digest(checkpoints: Path, tag: str) -> str:
    """The digest of a ZeRO checkpoint's fp32 weights as DeepSpeed's own zero_to_fp32 reads them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from harness.worker.strategy import WeightsDigest

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    digest = WeightsDigest()
    for name in sorted(state):
        digest.update(name, state[name])
    return digest.hexdigest()


def interrupted(tmp_path: Path, port: int, procs: int, **settings) -> tuple[Path, Path, dict]:
    """A one-stage run killed at step 9 (rank 0 SIGKILLs itself): checkpoints step3 and step6, steps
    1-8 logged."""
    plan = make_plan("elastic", [pretrain_phase("p", steps=STEPS, checkpoint_every=3, global_batch=GLOBAL_BATCH, **settings)], port=port, procs=procs)
    plan_path, out = write_plan(tmp_path, plan), tmp_path / "run"
    failed = harness("run", plan_path, "--out", out, env={**os.environ, "HARNESS_FAULT": "p:step9:0"})
    assert failed.returncode == 1, failed.stderr
    stage = StageDir(out / "phases" / "00-p")
    assert stage.latest_checkpoint() == "step6" and not stage.manifest.exists()
    return plan_path, out, plan


def rerun_with(tmp_path: Path, plan: dict, out: Path, **changes):
    phase = plan["phases"][0]
    for key, value in changes.items():
        (plan["cluster"] if key == "procs_per_node" else phase)[key] = value
    return harness("run", write_plan(tmp_path, plan), "--out", out, "--force")


def assert_steps_once_and_data_continued(stage: StageDir, manifest: Manifest) -> None:
    assert [row["stage_step"] for row in metric_rows(stage.root)] == list(range(1, STEPS + 1)), "each step logged once"
    assert list(manifest.data_position.values()) == [STEPS * GLOBAL_BATCH], "the data position continued from step 6"


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One interrupted ZeRO-2 run on 2 ranks (tags step3 and step6), which every test that starts
    from that state copies instead of running it again."""
    return interrupted(tmp_path_factory.mktemp("killed"), 29980, 2, zero_stage=2)


def copy_of(killed: tuple[Path, Path, dict], tmp_path: Path) -> tuple[Path, Path, dict]:
    """(plan, run folder, plan as data) of a fresh copy of the shared interrupted run."""
    plan_path, source, plan = killed
    shutil.copytree(source, tmp_path / "run")
    return plan_path, tmp_path / "run", json.loads(json.dumps(plan))


@pytest.mark.parametrize("zero, before, after", [(2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2)])
def test_resume_at_another_world_size_reshards_the_checkpoint(killed, tmp_path: Path, zero: int, before: int, after: int):
    if (zero, before) == (2, 2):
        _, out, plan = copy_of(killed, tmp_path)
    else:
        _, out, plan = interrupted(tmp_path, 29900 + 10 * zero + before, before, zero_stage=zero)
    stage = StageDir(out / "phases" / "00-p")
    saved = fp32_digest(stage.checkpoints, "step6")
    first_attempt = {row["stage_step"]: row["train/loss"] for row in metric_rows(stage.root)}

    shown = harness("plan", write_plan(tmp_path, {**plan, "cluster": {**plan["cluster"], "procs_per_node": after}}), "--out", out, "--force", check=True)
    assert "universal" in shown.stdout
    rerun = rerun_with(tmp_path, plan, out, procs_per_node=after)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = Manifest.read(stage.manifest)
    (resume,) = manifest.resumes
    assert (resume.mode, resume.tag, resume.stage_step, resume.world_size) == ("universal", "step6", 6, after)
    assert resume.weights_digest == saved, "the weights after the universal load are the checkpoint's fp32 weights"
    assert resume.optimizer_state_carried, "Adam moments came with the universal checkpoint"
    assert manifest.engine.world_size == after and manifest.stage_steps == STEPS
    assert CheckpointRecord.read(stage.checkpoints / f"step{STEPS}" / "complete").engine.world_size == after
    assert_steps_once_and_data_continued(stage, manifest)
    assert not list(stage.checkpoints.glob("universal-*")), "the converted copy goes once the stage is done"
    # The same global batch by accumulation on fewer ranks (or by more ranks), Adam's moments and
    # step count carried: steps 7 and 8 as the first attempt ran them, to float rounding.
    resumed = {row["stage_step"]: row["train/loss"] for row in metric_rows(stage.root)}
    assert [resumed[7], resumed[8]] == pytest.approx([first_attempt[7], first_attempt[8]], rel=1e-5)


def test_other_engine_settings_continue_from_the_consolidated_weights(tmp_path: Path):
    _, out, plan = interrupted(tmp_path, 29960, 2, zero_stage=2, scheduler={"type": "WarmupCosineLR", "warmup_ratio": 0.3})
    stage = StageDir(out / "phases" / "00-p")
    saved = fp32_digest(stage.checkpoints, "step6")
    first_attempt_lr = {row["stage_step"]: row["train/lr"] for row in metric_rows(stage.root)}

    rerun = rerun_with(tmp_path, plan, out, zero_stage=3, optimizer={"type": "SGD", "lr": 3e-3, "momentum": 0.9})

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = Manifest.read(stage.manifest)
    (resume,) = manifest.resumes
    assert (resume.mode, resume.tag, resume.stage_step) == ("consolidated", "step6", 6)
    assert "ZeRO stage 2 -> 3" in resume.reason and "optimizer AdamW -> SGD" in resume.reason
    assert resume.weights_digest == saved, "the model was built from the checkpoint's fp32 weights"
    assert not resume.optimizer_state_carried, "a fresh optimizer"
    rows = {row["stage_step"]: row for row in metric_rows(stage.root)}
    assert rows[7]["train/lr"] == pytest.approx(first_attempt_lr[7]), "the schedule went on from step 6, not from 0"
    assert manifest.engine.optimizer == "SGD" and manifest.engine.zero_stage == 3
    assert_steps_once_and_data_continued(stage, manifest)


def test_a_resume_that_cannot_work_is_refused_before_launch(killed, tmp_path: Path):
    plan_path, out, plan = copy_of(killed, tmp_path)
    stage = StageDir(out / "phases" / "00-p")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    shrunk = rerun_with(tmp_path, plan, out, steps=5)
    assert shrunk.returncode == 2
    assert "stage 'p' steps: 5 -> at least 6, where its checkpoint step6 already is" in shrunk.stderr
    assert f"move {stage.checkpoints} aside" in shrunk.stderr

    plan["phases"][0]["steps"] = STEPS
    plan["model"] = {"builtin": "small-llama"}
    other_model = rerun_with(tmp_path, plan, out)
    assert other_model.returncode == 2
    assert "stage 'p' model" in other_model.stderr and "the model its checkpoint step6 was trained from" in other_model.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before, "nothing written, nothing launched"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_step6(stage: StageDir, damage: str) -> Path:
    """Damage the newest tag one way; returns the file a message must name."""
    (victim,) = sorted((stage.checkpoints / "step6").glob("*optim_states.pt"))[:1]
    marker = stage.checkpoints / "step6" / "complete"
    {"truncated": truncate, "deleted": Path.unlink, "flipped": flip_a_byte, "marker garbled": lambda _: marker.write_text("{not json")}[damage](victim)
    return marker if damage == "marker garbled" else victim


@pytest.mark.parametrize("damage", ["truncated", "deleted", "flipped", "marker garbled"])
def test_every_kind_of_damage_is_found_by_checksum_before_launch(killed, tmp_path: Path, damage: str):
    """What a rerun would set aside, and where it resumes: found by the launch side from the tag's
    marker and checksums alone, before anything launches (the real rerun: next test)."""
    plan_path, out, _ = copy_of(killed, tmp_path)
    stage = StageDir(out / "phases" / "00-p")
    named = damage_step6(stage, damage)

    shown = cli("plan", plan_path, "--out", out, check=True)

    assert "step3 (native" in shown.stdout, "the stage resumes from the newest intact tag"
    assert "damaged, set aside at launch: step6 (" in shown.stdout and str(named) in shown.stdout, "the message names the damaged file"
    assert StageFile.read(stage.stage_json).resume.set_aside[0].startswith("step6 ")


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_stage_resumes_from_the_one_before(killed, tmp_path: Path):
    """Truncated (each kind of damage is found the same way: previous test), and without DeepSpeed's
    `latest` file, which the harness does not need: it loads the tag it chose by name."""
    plan_path, out, _ = copy_of(killed, tmp_path)
    stage = StageDir(out / "phases" / "00-p")
    named = damage_step6(stage, "truncated")
    damaged_bytes = {p.name: p.read_bytes() for p in (stage.checkpoints / "step6").iterdir()}
    (stage.checkpoints / "latest").unlink()

    rerun = harness("run", plan_path, "--out", out)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoint step6 (" in rerun.stdout and "is damaged; moved to" in rerun.stdout and str(named) in rerun.stdout
    (kept,) = (stage.checkpoints / "damaged").iterdir()
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged_bytes, "set aside as it was, not deleted"
    (resume,) = Manifest.read(stage.manifest).resumes
    assert (resume.mode, resume.tag) == ("native", "step3")
    assert [row["stage_step"] for row in metric_rows(stage.root)] == list(range(1, STEPS + 1))


def test_plan_shows_how_each_stage_resumes(killed, tmp_path: Path):
    plan_path, out, _ = copy_of(killed, tmp_path)

    shown = cli("plan", plan_path, "--out", out, check=True)

    assert "step6 (native" in shown.stdout
    assert StageFile.read(StageDir(out / "phases" / "00-p").stage_json).resume.tag == "step6"


@pytest.mark.parametrize("older", ["marker", "manifest"])
def test_a_run_folder_of_an_older_harness_is_refused_not_rerun(killed, tmp_path: Path, older: str):
    plan_path, out, _ = copy_of(killed, tmp_path)
    stage = StageDir(out / "phases" / "00-p")
    if older == "marker":  # before issue 12 a marker held only the progress
        (stage.checkpoints / "step6" / "complete").write_text(json.dumps({"stage_step": 6, "global_step_start": 0}) + "\n")
    else:
        stage.manifest.write_text(json.dumps({"format": 1, "stage": "p"}) + "\n")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    refused = cli("run", plan_path, "--out", out)

    assert refused.returncode == 2
    assert "was written by an older one" in refused.stderr and "--out" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before, "nothing rerun over it"
