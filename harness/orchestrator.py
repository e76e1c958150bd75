"""The run order: each unfinished stage, one after the other, judged by exit code and manifest.

A stage succeeded when its launcher exited 0 AND its manifest (written by rank 0 after a
final barrier) is valid. A rerun skips done stages, and the worker resumes an interrupted
stage from its latest checkpoint. The jobs around it live beside it: validation and stage
files in setup.py, hosts in hosts.py, the launcher process group in processes.py, failure
messages in failures.py, `harness status` in status.py, token stores in token_store.py. Never imports torch.
"""
from __future__ import annotations

from typing import Callable

from harness.failures import explain_exit, resume_advice
from harness.layout import RunDir, StageDir
from harness.processes import launch_stage
from harness.records import is_done, write_atomic
from harness.resume import drop_conversions, prepare_resume
from harness.setup import RunSetup, write_setup
from harness.stages import Stage
from harness.token_store import build_missing, required_stores


class StageFailed(Exception):
    """A stage's launcher failed or left no valid manifest."""

    def __init__(self, stage: Stage, stage_dir: StageDir, exit_code: int, detail: str, advice: str):
        self.exit_code = exit_code
        super().__init__(
            f"stage {stage.index:02d} '{stage.name}' (phase '{stage.phase}') failed: {detail} (exit code {exit_code}).\n"
            f"  log: {stage_dir.launcher_log}\n"
            f"{advice}"
        )


def run_stages(setup: RunSetup, only: int | None = None, echo: Callable[[str], None] = print) -> None:
    """Run every unfinished stage in order (or only stage number `only`); raises StageFailed at
    the first failure."""
    todo = [stage for stage in setup.stages if only in (None, stage.index)]
    # Tokenize before anything launches (no collective waits on it) and before anything is
    # written: a data problem is bad input (exit 2).
    build_missing(required_stores([stage for stage in todo if stage.index in setup.resumes]), echo)
    write_setup(setup)
    collect_metrics(setup.run)
    for stage in todo:
        stage_dir = _dir(setup, stage)
        if stage.index not in setup.resumes:
            echo(f"[harness] stage {stage.index:02d} {stage.name}: done, skipped")
            continue
        resume = setup.resumes[stage.index]
        echo(f"[harness] stage {stage.index:02d} {stage.name}: {stage.kind}, ZeRO-{stage.settings.zero_stage}, "
             f"{stage.world_size} rank(s), {stage.optimizer_type}, {stage.steps} steps"
             + ("" if resume.mode == "fresh" else f"; resumes from {resume.tag} ({resume.mode})"))
        prepare_resume(resume, stage, stage_dir, echo)
        try:
            exit_code = launch_stage(stage, stage_dir)
        finally:
            collect_metrics(setup.run)  # whatever happened, the run-level file has every row the stages wrote
        if is_done(stage_dir):
            if exit_code != 0:
                echo(f"[harness] stage {stage.index:02d} {stage.name}: the launcher exited {exit_code} after the manifest was "
                     "written; the handoff is complete and verified, so the stage is done")
            drop_conversions(stage_dir)
            continue
        if exit_code != 0:
            raise StageFailed(stage, stage_dir, exit_code, *explain_exit(stage, stage_dir, exit_code))
        raise StageFailed(stage, stage_dir, exit_code, "no valid manifest.json was written", resume_advice(stage_dir))
    if only is None:
        echo(f"[harness] all {len(setup.stages)} stage(s) done; final model: {_dir(setup, setup.stages[-1]).model}")


def _dir(setup: RunSetup, stage: Stage) -> StageDir:
    return setup.run.stage(stage.index, stage.name)


def collect_metrics(run: RunDir) -> None:
    """<out>/metrics.jsonl: the stages' metric lines in run order, derived from the stages' own
    files (so no window between a stage's rows and this file loses any)."""
    lines = "".join(d.metrics.read_text() for d in run.stage_dirs() if d.metrics.exists())
    write_atomic(run.metrics, lines)
