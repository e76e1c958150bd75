"""The run order: each unfinished stage, one after the other, judged by exit code and manifest.

Consecutive stages on the same topology share one launch (their ranks swap the engine in
place, stages.launch_groups). A stage succeeded when its manifest (written by rank 0 after a
final barrier) is valid and its launch exited 0 or went on to the next stage. A rerun skips
done stages, and the worker resumes an interrupted stage from its latest checkpoint. The jobs
around it live beside it: validation and stage files in setup.py, hosts in hosts.py, the
launcher process group in processes.py, failure messages in failures.py, the child programs
(token stores, checkpoint conversions) in jobs.py. Never imports torch.
"""
from __future__ import annotations

from collections import deque
from itertools import takewhile
from typing import Callable

from harness.launch.failures import explain_exit, resume_advice
from harness.launch.jobs import build_stores
from harness.launch.processes import launch_group
from harness.launch.resume import drop_conversions, prepare_resume
from harness.launch.setup import RunSetup, check_built_stores, write_setup
from harness.records import RunDir, StageDir, is_done, write_atomic
from harness.stages import Stage, launch_groups, required_stores


class StageFailed(Exception):
    """A stage's launcher failed or left no valid manifest."""

    def __init__(self, stage: Stage, stage_dir: StageDir, exit_code: int, detail: str, advice: str):
        self.exit_code = exit_code
        super().__init__(
            f"stage {stage.index:02d} '{stage.name}' (phase '{stage.phase}') failed: {detail} (exit code {exit_code}).\n"
            f"  log: {stage_dir.launcher_log}\n"
            f"{advice}"
        )


def run_stages(setup: RunSetup, only: set[int] | None = None, echo: Callable[[str], None] = print, verbose: bool = False) -> None:
    """Run every unfinished stage in order (or only the stage numbers in `only`), consecutive stages
    on the same topology in one launch (stages.launch_groups); raises StageFailed at the first failure.
    verbose: the console shows everything the launcher prints, not only the harness's lines."""
    todo = [stage for stage in setup.stages if only is None or stage.index in only]
    # Tokenize before anything launches (no collective waits on it) and before anything is
    # written: a data problem is bad input (exit 2).
    build_stores(required_stores([stage for stage in todo if stage.index in setup.resumes]), echo)
    check_built_stores([stage for stage in todo if stage.index in setup.resumes])
    write_setup(setup)
    collect_metrics(setup.run)
    for stage in todo:
        if stage.index not in setup.resumes:
            echo(f"[harness] stage {stage.index:02d} {stage.name}: done, skipped")
        else:
            prepare_resume(setup.resumes[stage.index], stage, _dir(setup, stage), echo)
    launches = deque(launch_groups(setup.stages, {stage.index for stage in todo if stage.index in setup.resumes}))
    while launches:
        group = launches.popleft()
        rest = _launch(setup, group, echo, verbose)
        if rest:  # the launch ended between two stages: the others start in a launch of their own
            launches.appendleft(rest)
    if only is None:
        echo(f"[harness] all {len(setup.stages)} stage(s) done; final model: {_dir(setup, setup.stages[-1]).model}")


def _launch(setup: RunSetup, group: list[Stage], echo: Callable[[str], None], verbose: bool) -> list[Stage]:
    """Run one launch of `group`; returns the stages still to run when the launch ended between two
    stages (a rank killed after a manifest, before the next stage began on every rank); raises
    StageFailed when a stage failed."""
    dirs = [_dir(setup, stage) for stage in group]
    if len(group) > 1:
        echo(f"[harness] stages {group[0].index:02d}-{group[-1].index:02d} share one launch on {group[0].world_size} rank(s): "
             "the ranks swap the engine between stages (cluster.transitions: swap)")
    try:
        exit_code = launch_group(group, dirs, verbose)
    finally:
        collect_metrics(setup.run)  # whatever happened, the run-level file has every row the stages wrote
    done = sum(1 for _ in takewhile(is_done, dirs))  # the stages run in order: the done ones come first
    for stage_dir in dirs[:done]:
        drop_conversions(stage_dir)
    rest = group[done:]
    if exit_code != 0 and done and (not rest or not _began_on_every_rank(rest[0], dirs[done])):
        last = group[done - 1]
        echo(f"[harness] stage {last.index:02d} {last.name}: the launcher exited {exit_code} after the manifest was "
             "written; the handoff is complete and verified, so the stage is done")
        return rest
    if not rest:
        return []
    failed, failed_dir = rest[0], dirs[done]
    if exit_code != 0:
        raise StageFailed(failed, failed_dir, exit_code, *explain_exit(failed, failed_dir, exit_code))
    raise StageFailed(failed, failed_dir, exit_code, "no valid manifest.json was written", resume_advice(failed_dir))


def _began_on_every_rank(stage: Stage, stage_dir: StageDir) -> bool:
    """Every rank of the launch wrote its rank record in the stage's folder (the first thing a rank
    does in a stage): only then is a failure the stage's own."""
    return len(stage_dir.rank_records()) == stage.world_size


def _dir(setup: RunSetup, stage: Stage) -> StageDir:
    return setup.run.stage(stage.index, stage.name)


def collect_metrics(run: RunDir) -> None:
    """<out>/metrics.jsonl: the stages' metric lines in run order, derived from the stages' own
    files (so no window between a stage's rows and this file loses any)."""
    lines = "".join(d.metrics.read_text() for d in run.stage_dirs() if d.metrics.exists())
    write_atomic(run.metrics, lines)
