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
from harness.manifest import valid_manifest, write_atomic
from harness.processes import launch_stage
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
    build_missing(required_stores([stage for stage in todo if not _done(setup.run, stage)]), echo)
    write_setup(setup)
    for stage in todo:
        stage_dir = setup.run.stage(stage.index, stage.name)
        if _done(setup.run, stage):
            echo(f"[harness] stage {stage.index:02d} {stage.name}: done, skipped")
            continue
        echo(f"[harness] stage {stage.index:02d} {stage.name}: {stage.kind}, ZeRO-{stage.settings.zero_stage}, "
             f"{stage.world_size} rank(s), {stage.optimizer_type}, {stage.steps} steps")
        exit_code = launch_stage(stage, stage_dir)
        if exit_code != 0:
            raise StageFailed(stage, stage_dir, exit_code, *explain_exit(stage, stage_dir, exit_code))
        if valid_manifest(stage_dir.manifest) is None:
            raise StageFailed(stage, stage_dir, exit_code, "no valid manifest.json was written", resume_advice(stage_dir))
        collect_metrics(setup.run)
    if only is None:
        echo(f"[harness] all {len(setup.stages)} stage(s) done; final model: {setup.run.stage(setup.stages[-1].index, setup.stages[-1].name).model}")


def _done(run: RunDir, stage: Stage) -> bool:
    return valid_manifest(run.stage(stage.index, stage.name).manifest) is not None


def collect_metrics(run: RunDir) -> None:
    """<out>/metrics.jsonl: the stages' metric lines in run order, one file for the whole run."""
    lines = "".join(d.metrics.read_text() for d in run.stage_dirs() if d.metrics.exists())
    write_atomic(run.metrics, lines)
