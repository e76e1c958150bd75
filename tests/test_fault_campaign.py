"""Fault campaign: kill a random rank at a random point (after a step, in a checkpoint save,
in the handoff, between the manifest and the exit) of a 2-rank, 2-stage run, several times in
a row; the rerun completes with the weights of an uninterrupted run and every step logged
exactly once. The campaign is seeded: HARNESS_FAULT_SEED=<seed> replays one (every failure
message names its seed and its faults). Also: a rank killed after the manifest leaves a done
stage and the run goes on; a damaged handoff is found by checksum and written again from the
stage's final checkpoint, and the next stage starts from the regenerated one."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, cli, finetune_phase, harness, make_plan, metric_rows, pretrain_phase, write_plan
from harness.records import StageDir
from harness.records import Manifest, is_done, read_json_lines
from test_resume import wait_for

pytestmark = pytest.mark.slow  # several DeepSpeed launches per test: left out of the developer loop

STEPS, CHECKPOINT_EVERY = 6, 2
STAGES = ["pre", "sft"]  # pretrain at ZeRO-2, then fine-tune at ZeRO-3 (a weights-only handoff)
RANKS = 2
FAULTS = 3
SEED_VAR = "HARNESS_FAULT_SEED"


def campaign_plan(port: int) -> dict:
    return make_plan("campaign", [
        pretrain_phase("pre", steps=STEPS, zero_stage=2, checkpoint_every=CHECKPOINT_EVERY),
        finetune_phase("sft", steps=STEPS, zero_stage=3, checkpoint_every=CHECKPOINT_EVERY),
    ], port=port)


def stage_dir(out: Path, index: int) -> StageDir:
    return StageDir(out / "phases" / f"{index:02d}-{STAGES[index]}")


def step_keys(rows: list[dict]) -> Counter:
    return Counter((row["stage"], row["stage_step"]) for row in rows)


@dataclass
class Reference:
    plan_path: Path
    out: Path
    after_stage0: Path
    """A copy of the run folder when only stage 0 was done (`harness run --only 0`)."""
    manifests: list[Manifest]
    losses: dict[tuple[str, int], float]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted run every test compares with: stage 0 (`--only 0`, copied for the
    damaged-handoff cases), then the rest. Each stage is launched once, without faults."""
    folder = tmp_path_factory.mktemp("reference")
    plan_path, out = write_plan(folder, campaign_plan(29760)), folder / "run"
    harness("run", plan_path, "--out", out, "--only", "0", check=True)
    shutil.copytree(out, folder / "after-stage0")
    harness("run", plan_path, "--out", out, check=True)
    rows = read_json_lines(out / "metrics.jsonl")
    return Reference(plan_path, out, folder / "after-stage0", [Manifest.read(stage_dir(out, i).manifest) for i in range(len(STAGES))],
                     {(row["stage"], row["stage_step"]): row["train/loss"] for row in rows})


def assert_same_as_reference(out: Path, reference: Reference, context: str) -> None:
    """Weights, logged steps and losses as in the uninterrupted run."""
    for index, expected in enumerate(reference.manifests):
        manifest = Manifest.read(stage_dir(out, index).manifest)
        assert is_done(stage_dir(out, index)), context
        assert manifest.weights_digest == expected.weights_digest, f"stage {STAGES[index]}: other weights than uninterrupted; {context}"
        assert manifest.optimizer_state_digest == expected.optimizer_state_digest, f"stage {STAGES[index]}: other optimizer state; {context}"
        assert manifest.data_position == expected.data_position and manifest.global_step_end == expected.global_step_end, context
        stage_steps = [row["stage_step"] for row in metric_rows(stage_dir(out, index).root)]
        assert stage_steps == list(range(1, STEPS + 1)), f"stage {STAGES[index]}'s own log: each step once; {context}"
    run_rows = read_json_lines(out / "metrics.jsonl")
    logged = step_keys(run_rows)
    assert [key for key, n in logged.items() if n != 1] == [], f"run-level metrics.jsonl: each (stage, step) once; {context}"
    assert set(logged) == set(reference.losses), f"run-level metrics.jsonl: the reference run's steps; {context}"
    losses = {(row["stage"], row["stage_step"]): row["train/loss"] for row in run_rows}
    assert losses == reference.losses, f"every step computed the same loss as uninterrupted; {context}"


# ---- the campaign ---------------------------------------------------------------------------

@dataclass
class StageModel:
    """What the test expects of one stage's folder: done, and its newest complete checkpoint."""

    done: bool = False
    checkpoint: int = 0  # 0: none


@dataclass(frozen=True)
class Fault:
    stage: int
    point: str
    rank: int

    @property
    def variable(self) -> str:
        return f"{STAGES[self.stage]}:{self.point}:{self.rank}"


def reachable_points(model: StageModel, last: bool) -> list[str]:
    """The fault points a launch of this stage passes, given the checkpoint it resumes from. A
    resumed stage never passes the steps up to its checkpoint; one resumed at its last step
    (its handoff was lost) passes no save either. `manifest` only as the last fault: it leaves
    a done stage and the run completes."""
    points = [f"step{n}" for n in range(model.checkpoint + 1, STEPS + 1)]
    if model.checkpoint < STEPS:
        points.append("save")
    points.append("handoff")
    if last:
        points.append("manifest")
    return points


def apply(fault: Fault, models: list[StageModel]) -> None:
    """How the faulted launch leaves the folders: earlier stages done; the faulted stage with the
    checkpoints it completed before the kill (a step's checkpoint comes after the step's fault
    point, a save's marker after the save's; the handoff's checkpoint is complete)."""
    for earlier in models[: fault.stage]:
        earlier.done, earlier.checkpoint = True, STEPS
    target = models[fault.stage]
    if fault.point.startswith("step"):
        step = int(fault.point.removeprefix("step"))
        target.checkpoint = max(target.checkpoint, (step - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY)
    elif fault.point == "handoff":
        target.checkpoint = STEPS
    elif fault.point == "manifest":
        for stage in models:
            stage.done, stage.checkpoint = True, STEPS


def campaign_seed() -> int:
    return int(os.environ[SEED_VAR]) if os.environ.get(SEED_VAR) else random.SystemRandom().randrange(2**32)


def pick_faults(seed: int, count: int) -> list[Fault]:
    """`count` faults, each in a stage that is not done when it is injected, at a point its
    launch reaches (stages are picked in run order: a later fault never targets a done stage)."""
    rng, models, faults = random.Random(seed), [StageModel() for _ in STAGES], []
    for k in range(count):
        first = next(i for i, m in enumerate(models) if not m.done)
        index = rng.randrange(first, len(STAGES))
        point = rng.choice(reachable_points(models[index], last=k == count - 1))
        faults.append(Fault(index, point, rng.randrange(RANKS)))
        apply(faults[-1], models)
    return faults


def expected_resume(models: list[StageModel]) -> tuple[str, int] | None:
    """(stage, tag step) that the next launch resumes from: the first unfinished stage with a checkpoint."""
    first = next((i for i, m in enumerate(models) if not m.done), None)
    if first is None or models[first].checkpoint == 0:
        return None
    return STAGES[first], models[first].checkpoint


def assert_resumed_as_expected(stdout: str, resume: tuple[str, int] | None, models_before: list[StageModel], context: str) -> None:
    first = next(i for i, m in enumerate(models_before) if not m.done)
    if resume is None:
        assert f"stage {STAGES[first]}: resuming" not in stdout, f"a stage without a checkpoint starts fresh; {context}"
    else:
        name, step = resume
        assert f"stage {name}: resuming from checkpoint step{step} (native" in stdout, f"resumed from step{step}; {context}\n{stdout[-3000:]}"


def test_random_faults_then_a_rerun_give_the_uninterrupted_run(reference: Reference, tmp_path: Path):
    seed = campaign_seed()
    faults = pick_faults(seed, FAULTS)
    context = f"{SEED_VAR}={seed} faults={[f.variable for f in faults]}"
    print(f"fault campaign: {context}")
    out = tmp_path / "run"
    models = [StageModel() for _ in STAGES]
    for k, fault in enumerate(faults):
        step_context = f"fault {k + 1} ({fault.variable}) of {context}"
        before = [StageModel(m.done, m.checkpoint) for m in models]
        resume = expected_resume(models)
        run = harness("run", reference.plan_path, "--out", out, env={**os.environ, "HARNESS_FAULT": fault.variable})
        apply(fault, models)
        assert_resumed_as_expected(run.stdout, resume, before, step_context)
        name = STAGES[fault.stage]
        if fault.point == "manifest":
            assert run.returncode == 0, f"{step_context}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            assert re.search(rf"stage {fault.stage:02d} {re.escape(name)}: the launcher exited [1-9]\d* after the manifest was written", run.stdout), step_context
        else:
            assert run.returncode == 1, f"a faulted run fails; {step_context}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            assert f"stage {fault.stage:02d} '{name}'" in run.stderr, step_context
        for index, model in enumerate(models):
            folder = stage_dir(out, index)
            assert is_done(folder) == model.done, f"stage {STAGES[index]} done={model.done}; {step_context}"
            if not model.done:
                assert folder.latest_checkpoint() == (f"step{model.checkpoint}" if model.checkpoint else None), step_context
    if not all(m.done for m in models):
        resume, before = expected_resume(models), [StageModel(m.done, m.checkpoint) for m in models]
        final = harness("run", reference.plan_path, "--out", out)
        assert final.returncode == 0, f"the clean rerun completes; {context}\n{final.stdout[-3000:]}\n{final.stderr[-3000:]}"
        assert_resumed_as_expected(final.stdout, resume, before, f"the clean rerun of {context}")
    assert_same_as_reference(out, reference, context)


def test_the_campaign_reaches_every_point_of_every_stage_on_every_rank():
    """Over seeds, the picks cover every (stage, kind of point, rank): no fault is never tried."""
    seen = {(f.stage, re.sub(r"\d+$", "", f.point), f.rank) for seed in range(500) for f in pick_faults(seed, FAULTS)}
    assert seen == {(stage, point, rank) for stage in range(len(STAGES)) for point in ("step", "save", "handoff", "manifest")
                    for rank in range(RANKS)}


# ---- a rank killed between the manifest and its exit -----------------------------------------

def launches_of(stage: StageDir) -> int:
    """How many launches ran the stage: each writes a "[harness] <date> <argv>" header into its log."""
    return len(re.findall(r"^\[harness\] \d{4}-\d\d-\d\d ", stage.launcher_log.read_text(), re.M)) if stage.launcher_log.exists() else 0


def test_rank_killed_after_the_manifest_leaves_a_done_stage_and_the_run_goes_on(reference: Reference, tmp_path: Path):
    plan_path, out = write_plan(tmp_path, campaign_plan(29780)), tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", plan_path, "--out", out], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HARNESS_FAULT": "pre:manifest:1"})
    try:
        # Stage 1's second launch (its log's second header) starts after the run-level metrics were
        # rebuilt for the failed launch: the ranks shared one launch, and the kill ended it.
        wait_for(lambda: launches_of(stage_dir(out, 1)) >= 2 or run.poll() is not None, 300, "stage 1's own launch")
        during_stage1 = step_keys(read_json_lines(out / "metrics.jsonl"))
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    exited = re.search(r"stage 00 pre: the launcher exited (\d+) after the manifest was written", stdout)
    assert exited and int(exited.group(1)) != 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    assert run.returncode == 0, stderr[-3000:]
    assert "stage 01 sft: finetune" in stdout and "all 2 stage(s) done" in stdout, "stage 1 ran in the same `harness run`"
    assert launches_of(stage_dir(out, 1)) == 2, "the launch both stages shared ended with the kill; stage 1 ran in a new one"
    assert {("pre", step) for step in range(1, STEPS + 1)} <= set(during_stage1), \
        "stage 0's rows are in the run-level metrics.jsonl although its launcher failed"
    assert Manifest.read(stage_dir(out, 0).manifest).resumes == [], "stage 0 was not run again"
    assert_same_as_reference(out, reference, "pre:manifest:1")


# ---- a damaged handoff ----------------------------------------------------------------------

def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped": lambda stage: flip_a_byte(stage.model / "model.safetensors"),
    "truncated": lambda stage: truncate(stage.model / "model.safetensors"),
    "manifest garbage": lambda stage: stage.manifest.write_text("{garbage"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_kind_of_damaged_handoff_is_found_and_the_stage_is_not_done(reference: Reference, tmp_path: Path, damage: str):
    """Found by checksum (or a manifest that does not parse) where the launch side asks whether a
    stage is done: `harness status` says so and a rerun would run it (the real rerun: next test)."""
    out = tmp_path / "run"
    shutil.copytree(reference.after_stage0, out)
    pre = stage_dir(out, 0)
    assert is_done(pre)
    DAMAGE[damage](pre)

    status = harness("status", out, check=True, env={**os.environ, "COLUMNS": "200"})
    (row,) = [line for line in status.stdout.splitlines() if re.search(r"\b00\b.*\bpre\b", line)]
    assert "damaged handoff" in row, status.stdout
    assert not is_done(pre)
    assert f"step{STEPS} (native" in cli("plan", reference.plan_path, "--out", out, check=True).stdout, "a rerun resumes at the final checkpoint"


def test_a_damaged_handoff_is_written_again_from_the_final_checkpoint(reference: Reference, tmp_path: Path):
    """The model file truncated (the other kinds are found the same way: previous test)."""
    out = tmp_path / "run"
    shutil.copytree(reference.after_stage0, out)
    pre, sft = stage_dir(out, 0), stage_dir(out, 1)
    before = Manifest.read(pre.manifest)
    tags = sorted(p.name for p in pre.checkpoints.glob("step*"))
    assert tags == [f"step{STEPS - CHECKPOINT_EVERY}", f"step{STEPS}"] and is_done(pre) and not is_done(sft)
    DAMAGE["truncated"](pre)

    rerun = harness("run", reference.plan_path, "--out", out)

    assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
    assert f"stage pre: resuming from checkpoint step{STEPS} (native" in rerun.stdout
    assert is_done(pre) and is_done(sft)
    regenerated = Manifest.read(pre.manifest)
    assert regenerated.weights_digest == before.weights_digest == reference.manifests[0].weights_digest
    assert [(r.mode, r.tag, r.stage_step) for r in regenerated.resumes] == [("native", f"step{STEPS}", STEPS)]
    assert regenerated.stage_steps == STEPS and regenerated.load == before.load, "the original handoff record is kept"
    following = Manifest.read(sft.manifest)
    assert following.load.mode == "weights_only" and following.load.source == str(pre.model.resolve())
    assert following.start_weights_digest == regenerated.weights_digest, "stage 1 started from the regenerated handoff"
    assert following.weights_digest == reference.manifests[1].weights_digest
    assert set(tags) <= {p.name for p in pre.checkpoints.glob("step*")}, "nothing trained is deleted"
    assert [row["stage_step"] for row in metric_rows(pre.root)] == list(range(1, STEPS + 1))
    assert step_keys(read_json_lines(out / "metrics.jsonl")) == Counter(reference.losses.keys())
