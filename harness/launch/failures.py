"""Why a stage failed, said so the user knows what to do next. Never imports torch.

The launcher's exit code says how its first failed rank ended: -N when the launcher itself
died of signal N, 256-N when DeepSpeed's launch.py passes a rank's -N on to sys.exit (a
SIGKILLed rank gives 247), 128+N from a shell or srun. Which rank it was, the launcher does
not say (0.19.8 logs the last rank's command line, whichever failed): each rank records that
itself (harness/worker/memory.py), and a watched rank that recorded no end was SIGKILLed.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from harness.records import InvalidRecord, MemoryRecord, RankRecord, StageDir
from harness.records.exit_codes import PREEMPTED
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
