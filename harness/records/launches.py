"""What a launch leaves besides its stages' records: where each rank runs and what memory it
peaked at (ranks/), and the SLURM jobs `harness submit` rendered (slurm/jobs.json)."""
from __future__ import annotations

from typing import Any

from harness.records.files import Record
from harness.records.memory import MemoryEstimate

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



class SlurmJob(Record):
    """One rendered (and maybe submitted) batch job, in slurm/jobs.json."""

    name: str
    script: str
    stages: list[int]
    job_id: str | None = None


class SlurmJobs(Record):
    jobs: list[SlurmJob]
