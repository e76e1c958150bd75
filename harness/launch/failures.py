"""Why a stage failed, said so the user knows what to do next. Never imports torch.

The launcher's exit code says how its first failed rank ended: -N when the launcher itself
died of signal N, 256-N when DeepSpeed's launch.py passes a rank's -N on to sys.exit (a
SIGKILLed rank gives 247), 128+N from a shell or srun. Which rank it was, the launcher does
not say (0.19.8 logs the last rank's command line, whichever failed): each rank records that
itself (harness/worker/memory.py), and a watched rank that recorded no end was SIGKILLed.
"""
from __future__ import annotations

import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from harness.records import (CHECKPOINT_COMPLETE, CheckpointRecord, HangRecord, InvalidRecord, MemoryRecord, NonFiniteRecord,
                             RankRecord, StageDir)
from harness.records.exit_codes import DISK_FULL, PREEMPTED
from harness.stages import Stage
from harness.stages.resume import intact_checkpoint


@dataclass
class RankEnd:
    """One rank of a failed launch, as its own files tell it."""

    rank: int
    log: Path
    end: str | None
    """'killed' (watched, nothing recorded: SIGKILL), 'exited', 'crashed', 'stopped' (SIGTERM from
    the launcher after another rank failed), or None (the rank recorded nothing to go by)."""
    memory: MemoryRecord | None
    """The rank's last memory record, if any."""


def signal_of(exit_code: int) -> int | None:
    """The signal behind a launcher exit code, if one is (see the module docstring)."""
    if exit_code < 0:
        return -exit_code
    if 128 < exit_code <= 128 + 64:
        return exit_code - 128
    if 256 - 64 < exit_code < 256:
        return 256 - exit_code
    return None


def rank_ends(stage_dir: StageDir) -> list[RankEnd]:
    """Every rank that started (wrote ranks/rank<N>.json), with how it ended and its memory."""
    ends = []
    for rank_file in stage_dir.rank_records():
        rank = RankRecord.read(rank_file).rank
        memory = _read_memory(stage_dir.rank_memory(rank))
        ends.append(RankEnd(rank, stage_dir.rank_log(rank), _end_of(stage_dir.rank_end(rank)), memory))
    return sorted(ends, key=lambda e: e.rank)


def _end_of(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    if not text.strip():
        return "killed"
    if "Fatal Python error" in text:
        return "crashed"
    return "exited" if text.startswith("exit") else "stopped"


def _read_memory(path: Path) -> MemoryRecord | None:
    try:
        return MemoryRecord.read(path)
    except InvalidRecord:
        return None


def explain_exit(stage: Stage, stage_dir: StageDir, exit_code: int) -> tuple[str, str]:
    """(what happened, what to do) for a launcher that exited with `exit_code` != 0."""
    if exit_code == PREEMPTED:
        return "stopped on request (preemption) after saving a checkpoint", resume_advice(stage_dir)
    for explain in (explain_hang, explain_nonfinite, explain_disk_full, explain_port_conflict):
        explained = explain(stage, stage_dir, exit_code)
        if explained is not None:
            return explained
    ranks = rank_ends(stage_dir)
    killed = [r for r in ranks if r.end == "killed"]
    signum = signal_of(exit_code)
    if killed or signum == signal.SIGKILL:
        who = _rank_names(killed) + (" was" if len(killed) == 1 else " were") if killed else "a rank was"
        detail = f"{who} killed by SIGKILL, most often the kernel's out-of-memory killer"
        return detail, _memory_table(ranks) + "\n" + memory_advice(stage, stage_dir)
    first = [r for r in ranks if r.end in ("exited", "crashed")]
    if signum is not None:
        detail = f"a rank ended on signal {_signal_name(signum)}"
    else:
        detail = "the launcher reported a failure"
    if first:
        detail += f"; {_rank_names(first)} failed first, see " + ", ".join(str(r.log) for r in first)
    return detail, resume_advice(stage_dir)


def explain_hang(stage: Stage, stage_dir: StageDir, exit_code: int) -> tuple[str, str] | None:
    """The watchdog's verdict (harness/launch/watchdog.py), if it ended the launch."""
    try:
        hang = HangRecord.read(stage_dir.hang)
    except InvalidRecord:
        return None
    hosts = ", ".join(sorted({r.host or "?" for r in hang.stuck}))
    if not all(r.running for r in hang.stuck):
        why = "its heartbeat stopped: stopped, frozen in native code, or its node unreachable" if len(hang.stuck) == 1 else \
              "their heartbeats stopped: stopped, frozen in native code, or their nodes unreachable"
    else:
        why = "still running but stuck (a collective that never completes, a deadlock, a loop)"
    still = max(r.still_s for r in hang.stuck + hang.others)
    detail = (f"hung: no progress for {still:.0f} s (allowed {hang.allowance_s:.0f} s); {_rank_names(hang.stuck)} on {hosts} "
              f"{'is' if len(hang.stuck) == 1 else 'are'} stuck, {why}; the launch was ended")
    lines = []
    for rank in hang.stuck + hang.others:
        state = "stuck" if rank in hang.stuck else "waiting"
        seen = f"{rank.doing} at step {rank.step}, running" if rank.running else f"last seen in {rank.doing} at step {rank.step}, not running"
        lines.append(f"  rank {rank.rank} ({rank.host}, {state}, {seen}); stack ({hang.stacks_from}) in {stage_dir.rank_log(rank.rank)}:")
        lines += [f"      {frame}" for frame in rank.stack] or ["      (no stack could be taken)"]
    lines.append(resume_advice(stage_dir))
    lines.append("  if it was only slow, raise hang_timeout in the plan (the default is the larger of 300 s and 20 x the slowest step)")
    return detail, "\n".join(lines)


def explain_nonfinite(stage: Stage, stage_dir: StageDir, exit_code: int) -> tuple[str, str] | None:
    """The ranks' record of a stage stopped on a loss that was not finite (harness/worker/stops.py)."""
    try:
        record = NonFiniteRecord.read(stage_dir.nonfinite)
    except InvalidRecord:
        return None
    steps = f"steps {record.steps[0]}-{record.steps[-1]}" if len(record.steps) > 1 else f"step {record.steps[0]}"
    last = (f"the last finite loss was {record.last_finite_loss:.4g} at step {record.last_finite_step}" if record.last_finite_step is not None
            else "no step of this run had a finite loss")
    detail = (f"the training loss was not finite ({', '.join(record.losses)}) at {steps}, stopped at step {record.steps[-1]} "
              f"(nonfinite_steps: {record.limit}); {last}; no checkpoint of a non-finite state was saved")
    checkpoint = intact_checkpoint(stage_dir)
    resumes = f"resumes from its newest checkpoint, {checkpoint}" if checkpoint else "starts the stage again (it has no checkpoint)"
    advice = (f"  a rerun {resumes}, and most likely diverges the same way: lower optimizer.lr, raise scheduler.warmup_ratio, "
              "keep grad_clip on, or use bf16/fp32 instead of fp16")
    return detail, advice


def explain_disk_full(stage: Stage, stage_dir: StageDir, exit_code: int) -> tuple[str, str] | None:
    """A checkpoint or handoff that did not fit on its disk: the ranks' exit code, or one left half
    written on a disk with less free than it needs (the rank that failed first may have failed otherwise)."""
    written, what, needed = _being_written(stage, stage_dir)
    folder = written or stage_dir.checkpoints
    free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    if exit_code != DISK_FULL and not (written is not None and needed is not None and free < needed):
        return None
    about = f"about {_mb(needed)} needed, " if needed else ""
    detail = f"the disk is full (ENOSPC, or the quota: EDQUOT) writing {what} into {folder}: {about}{_mb(free)} free there"
    checkpoint = intact_checkpoint(stage_dir)
    resumes = f"resumes from its newest intact checkpoint ({checkpoint})" if checkpoint else "starts the stage again (no intact checkpoint)"
    advice = (f"  nothing half-written counts: no checkpoint was marked complete and no handoff counted done. Make space on that disk "
              f"(or lower keep_checkpoints), then run the same command: it {resumes}.")
    return detail, advice


def explain_port_conflict(stage: Stage, stage_dir: StageDir, exit_code: int) -> tuple[str, str] | None:
    """EADDRINUSE in a rank's output: another program took the master port between the check and the bind."""
    for log in [stage_dir.launcher_log, *sorted(stage_dir.ranks.glob("rank*.log"))]:
        found = PORT_IN_USE.search(_tail(log))
        if found:
            port = found[1] or "the master port"
            return (f"a port conflict: another program took port {port} before the ranks could listen on it (EADDRINUSE, in {log})",
                    "  harness launches on one machine reserve their ports from each other, other programs do not: set "
                    "cluster.master_port to a start port nothing else here uses, then run the same command")
    return None


PORT_IN_USE = re.compile(r"(?:port: (\d+)[^\n]*)?EADDRINUSE")


def _tail(path: Path, size: int = 1 << 16) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _being_written(stage: Stage, stage_dir: StageDir) -> tuple[Path | None, str, int | None]:
    """(folder, what, about how many bytes it needs) of what the stage was writing when it stopped,
    as its folder shows: a checkpoint tag newer than the newest complete one and without its marker,
    or a handoff model without a manifest; (None, 'a checkpoint', its size) when neither is there."""
    complete = stage_dir.latest_checkpoint()
    newest = int(complete.removeprefix("step")) if complete else -1
    started = sorted(int(p.name.removeprefix("step")) for p in stage_dir.checkpoints.glob("step*")
                     if p.name.removeprefix("step").isdigit() and not (p / CHECKPOINT_COMPLETE).exists())
    if started and started[-1] > newest:
        return stage_dir.checkpoints / f"step{started[-1]}", f"checkpoint step{started[-1]}", _checkpoint_bytes(stage_dir)
    if stage_dir.model.exists() and not stage_dir.manifest.exists():
        return stage_dir.model, "the handoff model", _handoff_bytes(stage, stage_dir)
    return None, "a checkpoint", _checkpoint_bytes(stage_dir)


def _checkpoint_bytes(stage_dir: StageDir) -> int | None:
    """About what a checkpoint of the stage takes: its newest complete one, else from its parameters
    (fp32 weights and two fp32 Adam moments: 12 bytes each, more than most optimizers keep)."""
    tag = stage_dir.latest_checkpoint()
    if tag is not None:
        try:
            return sum(check.bytes for check in CheckpointRecord.read(stage_dir.checkpoints / tag / CHECKPOINT_COMPLETE).files.values())
        except InvalidRecord:
            pass
    params = _parameters(stage_dir)
    return 12 * params if params else None


def _handoff_bytes(stage: Stage, stage_dir: StageDir) -> int | None:
    params = _parameters(stage_dir)
    return params * (2 if stage.handoff_dtype == "bf16" else 4) if params else None


def _parameters(stage_dir: StageDir) -> int | None:
    """The model's parameters, as rank 0 recorded them once built (harness/worker/memory.py)."""
    memory = _read_memory(stage_dir.rank_memory(0))
    built = memory.milestones.get("model_built", {}) if memory else {}
    return (built.get("parameters") or {}).get("total")


def resume_advice(stage_dir: StageDir) -> str:
    """What running the same command again does (after fixing what the log shows, if anything)."""
    checkpoint = intact_checkpoint(stage_dir)
    if checkpoint is None:
        return "  rerun the same command to run it again from its start (it has no intact checkpoint)."
    return f"  rerun the same command to resume it from its newest intact checkpoint ({checkpoint})."


def memory_advice(stage: Stage, stage_dir: StageDir) -> str:
    """What lowers each rank's host memory, for this stage's settings. Running again unchanged
    would most likely be killed the same way, so no 'rerun' here."""
    s = stage.settings
    changes = []
    if s.micro_batch == "auto":
        changes.append("micro_batch: auto measured what fits at the stage's start; give a smaller micro_batch (global_batch stays)")
    elif s.micro_batch > 1:
        changes.append(f"micro_batch: {s.micro_batch} -> {max(1, s.micro_batch // 2)} (global_batch stays: more accumulation steps)")
    if stage.activation_checkpointing != "full":
        changes.append("activation_checkpointing: full (decoder layers recomputed in the backward instead of keeping their activations)")
    if stage.zero_stage < 3:
        changes.append(f"zero_stage: {stage.zero_stage} -> 3 (weights, gradients and optimizer state sharded over the ranks, not one copy each)")
    if stage.accelerator == "cuda":
        if stage.offload.optimizer or stage.offload.params:
            changes.append("offload: it keeps optimizer state (and parameters) in host memory; offload less, or use more nodes")
        else:
            changes.append("offload: only if GPU memory is what runs short, it moves state from the GPU into host memory")
    if stage.procs_per_node > 1:
        changes.append(f"procs_per_node: {stage.procs_per_node} -> fewer ranks sharing one node's memory (more nodes keep the world size)")
    changes.append("a machine with more memory")
    lines = ["  the same plan would most likely be killed the same way; lower each rank's memory first, in the plan:"]
    lines += [f"    - {change}" for change in changes]
    checkpoint = intact_checkpoint(stage_dir)
    if checkpoint:
        lines.append(f"  if something other than memory sent the SIGKILL, the same command resumes from {checkpoint}.")
    return "\n".join(lines)


def _memory_table(ranks: list[RankEnd]) -> str:
    lines = []
    for r in ranks:
        how = {"killed": "killed", "stopped": "stopped by the launcher", "exited": "exited", "crashed": "crashed"}.get(r.end, "end not recorded")
        memory = r.memory
        if memory:
            total = f" of {_gb(memory.host_memory_bytes)} on {memory.host}" if memory.host_memory_bytes else ""
            estimated = f", estimated {_gb(memory.estimate_bytes)}" if memory.estimate_bytes else ""
            peak = f"peak RSS {_gb(memory.peak_rss_bytes)}{total}{estimated} (last recorded at '{memory.milestone}')"
        else:
            peak = "no memory recorded"
        lines.append(f"  rank {r.rank}: {how}; {peak}; log: {r.log}")
    return "\n".join(lines) if lines else "  (no rank recorded its memory)"


def _rank_names(ranks: list[RankEnd]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r.rank) for r in ranks)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
