"""What a launch leaves besides its stages' records: where each rank runs and what memory it
peaked at (ranks/), and the SLURM jobs `harness submit` rendered (slurm/jobs.json)."""
from __future__ import annotations

import signal
from typing import Any

from harness.records.files import Record
from harness.records.memory import MemoryEstimate

STACK_SIGNAL = signal.SIGUSR2
"""The worker's faulthandler prints every thread's stack to the rank's log on this signal: the launch
side's way to see where a hung rank is when py-spy is not installed (harness/launch/watchdog.py)."""

class RankRecord(Record):
    """ranks/rank<N>.json: where a rank runs, so the launch side ends exactly these processes."""

    rank: int
    node_rank: int
    host: str
    address: str | None
    slurm_node: str | None
    pid: int
    launcher_pid: int
    time: float


class MemoryRecord(Record):
    """ranks/memory-rank<N>.json: the rank's peak and current RSS at its last milestone, and at each."""

    rank: int
    host: str
    pid: int
    milestone: str
    time: float
    peak_rss_bytes: int
    rss_bytes: int
    host_memory_bytes: int | None
    milestones: dict[str, dict[str, Any]]
    estimate_bytes: int | None = None
    """The stage's per-rank estimate (stage.json's memory plan, harness/stages/memory.py), to read
    against peak_rss_bytes on cpu and gpu_peak_bytes on cuda; None when the stage had none."""
    estimate: MemoryEstimate | None = None



class Heartbeat(Record):
    """ranks/heartbeat-rank<N>.json of the stage a rank is in: what it is doing, rewritten once a
    second by a thread of the rank (harness/worker/heartbeat.py). The launch side reads progress
    from `doing` and `step` changing, and that the rank runs at all from `beat` moving, each by its
    own clock (the rank's `time` may come from another node's)."""

    rank: int
    host: str
    pid: int
    doing: str
    """starting, building, probe, reference pass, first step, step, eval, checkpoint save, handoff."""
    step: int
    """The stage step it works on (the one it runs, or the last it finished)."""
    beat: int
    """Counts the rewrites of this rank's heartbeat (across the stages of its launch)."""
    time: float
    slowest_step_s: float | None = None
    """The slowest step of the stage so far on this rank, its first step excepted (compiling)."""


class StuckRank(Record):
    """One rank as a hang found it."""

    rank: int
    host: str | None
    doing: str
    step: int
    still_s: float
    """Seconds without progress (without a heartbeat at all, when `running` is false)."""
    running: bool
    """Its heartbeat still beats (a rank that stops beating is stopped, frozen with the GIL held, or its node is gone)."""
    stack: list[str] = []
    """The innermost frames of its main thread, innermost first (empty: none could be taken)."""


class HangRecord(Record):
    """ranks/hang.json of the stage a hung launch was in: written by the launch side's watchdog
    just before it ends the launch; the stage's failure message is made from it."""

    allowance_s: float
    """How long the work of the first rank found without progress was allowed to take."""
    stuck: list[StuckRank]
    others: list[StuckRank]
    stacks_from: str
    """How the stacks were taken (py-spy, or STACK_SIGNAL to the worker's faulthandler)."""


class NonFiniteRecord(Record):
    """ranks/nonfinite.json: the stage stopped on a training loss that was not finite (rank 0 writes it)."""

    steps: list[int]
    """The steps in a row whose loss was not finite, the last one where the stage stopped."""
    losses: list[str]
    """Their losses ('nan', 'inf', '-inf')."""
    last_finite_step: int | None
    last_finite_loss: float | None
    limit: int
    """nonfinite_steps."""


class SlurmJob(Record):
    """One rendered (and maybe submitted) batch job, in slurm/jobs.json."""

    name: str
    script: str
    stages: list[int]
    job_id: str | None = None


class SlurmJobs(Record):
    jobs: list[SlurmJob]
