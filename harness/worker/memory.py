"""What the launch side needs to explain a rank's death: its memory, and how it ended.

- record_memory: at milestones (before the model, model built, engine initialized, each
  checkpoint, the end) a rank writes its peak RSS (VmHWM, since the stage began) and current RSS to
  ranks/memory-rank<N>.json, so a rank the kernel's out-of-memory killer ends leaves its last
  known peak behind, and benchmarks and tests read where memory went.
- watch_end: from then on ranks/end-rank<N>.txt records how the rank ended (in this stage): 'exit' at a
  normal interpreter exit (an exception included), the stack at SIGTERM (the launcher stops
  the other ranks that way when one fails) or at a fatal signal. SIGKILL cannot be caught:
  a rank that was watched and left the file empty was SIGKILLed.
No torch here: plain /proc reads, cheap enough for every checkpoint.
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from harness.records import InvalidRecord, MemoryRecord, StageDir
from harness.records.memory import MemoryEstimate


def record_memory(stage_dir: StageDir, rank: int, milestone: str, estimate: MemoryEstimate | None = None, **fields: Any) -> None:
    """Write this rank's peak and current RSS at `milestone`, with any `fields` (e.g. the
    parameter storage after the model is built). Atomic; every milestone's figures are kept
    under `milestones`, the newest also at the top level. `estimate`: the stage's per-rank
    estimate, given at the first milestone and kept by the later ones."""
    path = stage_dir.rank_memory(rank)
    peak, current = rss_bytes()
    try:
        before = MemoryRecord.read(path)
        milestones, estimate = before.milestones, estimate or before.estimate
    except InvalidRecord:
        milestones = {}
    milestones[milestone] = {"peak_rss_bytes": peak, "rss_bytes": current, "time": time.time(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    MemoryRecord(rank=rank, host=socket.gethostname(), pid=os.getpid(), milestone=milestone, time=time.time(), peak_rss_bytes=peak,
                 rss_bytes=current, host_memory_bytes=_host_memory_bytes(), milestones=milestones, estimate=estimate,
                 estimate_bytes=estimate.total_bytes if estimate else None).write(path)


_end_file: int | None = None
"""The open ranks/end-rank<N>.txt of the stage this rank is in (None before the first)."""


def watch_end(stage_dir: StageDir, rank: int) -> None:
    """Record how this rank ends in ranks/end-rank<N>.txt (see the module docstring). The next
    stage of the same launch takes the watch over: the finished stage's file then says 'exit'.
    faulthandler writes from its C signal handler, so the stack is recorded even while the
    main thread waits inside a collective, where a Python handler would never run."""
    global _end_file
    if _end_file is not None:
        record_exit()
        atexit.unregister(record_exit)
        os.close(_end_file)
    stage_dir.ranks.mkdir(parents=True, exist_ok=True)
    _end_file = os.open(stage_dir.rank_end(rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    faulthandler.enable(file=_end_file, all_threads=False)
    faulthandler.register(signal.SIGTERM, file=_end_file, all_threads=False, chain=True)  # chain: still terminates
    atexit.register(record_exit)


def record_exit() -> None:
    """'exit' in the watched stage's end file: the rank left it by itself (also called before
    os._exit, which skips atexit)."""
    os.write(_end_file, b"exit\n")


def reset_peak() -> None:
    """Start this process's peak RSS (VmHWM) again from its current RSS: the next stage of a launch
    then records its own peak, not the largest of the stages before it (Linux; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_bytes() -> tuple[int, int]:
    """(peak RSS since the stage began or the last reset_peak, current RSS) of this process, in bytes."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in fields:  # not Linux: ru_maxrss is bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), 0
    return fields["VmHWM"], fields.get("VmRSS", 0)


def _host_memory_bytes() -> int | None:
    return meminfo_bytes("MemTotal")


def meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo figure in bytes (MemTotal, MemAvailable, ...); None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
