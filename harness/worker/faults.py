"""Fault injection, for the fault-campaign tests and for users who want to see recovery work:
HARNESS_FAULT=<stage name>:<point>:<rank> makes that rank SIGKILL itself at that point, once
per launch (a rerun without the variable runs clean). Points: step<N> (after optimizer step
N), save (a checkpoint's files written, not yet marked complete), handoff (checkpoint done,
Hugging Face model written, manifest not yet), manifest (manifest written, rank not exited).
"""
from __future__ import annotations

import os
import signal

from harness.records.environment import FAULT_VAR
from harness.stages import Stage


def fault_point(stage: Stage, rank: int, point: str) -> None:
    """SIGKILL this rank if HARNESS_FAULT names this stage, point and rank."""
    if os.environ.get(FAULT_VAR) == f"{stage.name}:{point}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
