"""Hung ranks: while a launch runs, its ranks' heartbeats (harness/worker/heartbeat.py) are read once
a second. A rank makes progress when what it does changes (a step, an eval, a checkpoint save...);
one that makes none for longer than its allowance hangs the launch. Then every rank's Python stack
goes to its log (`py-spy dump` where py-spy is installed, else records.STACK_SIGNAL, which the
worker's faulthandler answers), the verdict goes to ranks/hang.json (records.HangRecord: which
ranks are stuck, on which host, doing what, their innermost frames), and the launch is ended;
harness/launch/failures.py makes the stage's failure message from the verdict.

Allowance: the stage's hang_timeout, by default the larger of 300 s and 20 x the slowest step any
rank has seen; LONG_FACTOR times that while a rank starts, builds its stage, probes the micro
batch, runs a reference pass, its first step (compiling), an eval, a checkpoint save or the handoff.
Which ranks are stuck: those whose heartbeat stopped beating (stopped, frozen with the GIL held, or
their node gone); else the ones furthest behind; else (all at the same place) every rank.
Times are this process's own clock: a remote rank's clock never enters. Never imports torch.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.records import STACK_SIGNAL, HangRecord, Heartbeat, InvalidRecord, RankRecord, StageDir, StuckRank
from harness.stages import Stage

POLL_S = 1.0
LONG_FACTOR = 6
LONG_WORK = {"starting", "building", "probe", "reference pass", "first step", "eval", "checkpoint save", "handoff"}
DEFAULT_TIMEOUT_S = 300.0
STEP_MULTIPLE = 20
NOT_BEATING_S = 10.0
"""A heartbeat unchanged this long: the rank does not run (it is rewritten every second)."""
STACK_FRAMES = 4
STACK_WAIT_S = 3.0
"""How long the worker's faulthandler gets to print a stack after STACK_SIGNAL."""


@dataclass
class _Seen:
    """One rank as the watchdog has seen it, timed by this process's clock."""

    beat: Heartbeat | None = None
    stage: int = 0
    """Index in the launch's stages of the folder its heartbeat is in."""
    progress_at: float = field(default_factory=time.monotonic)
    beat_at: float = field(default_factory=time.monotonic)

    @property
    def place(self) -> tuple[int, int, str]:
        return (self.stage, self.beat.step, self.beat.doing) if self.beat else (-1, 0, "starting")


class HangWatch:
    """Watches one launch from a thread of its own while the launch streams (harness/launch/processes.py);
    `stop` ends the launch when it hangs. Use as a context manager around the launch."""

    def __init__(self, stages: list[Stage], stage_dirs: list[StageDir], hosts: list[str], stop: Callable[[], None]):
        self.stages, self.dirs, self.hosts, self.stop = stages, stage_dirs, hosts, stop
        self.seen = {rank: _Seen() for rank in range(stages[0].world_size)}
        self.slowest_step_s = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="harness-hang-watch", daemon=True)

    def __enter__(self) -> HangWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            self.look()
            hung = [rank for rank, seen in self.seen.items() if time.monotonic() - seen.progress_at > self.allowance(seen)]
            if hung and not self._done.is_set():
                self.end_hung_launch(self.allowance(self.seen[hung[0]]))
                return

    def look(self) -> None:
        """Read every rank's newest heartbeat (the folder of the latest stage it reached)."""
        now = time.monotonic()
        for rank, seen in self.seen.items():
            found = [(beat, k) for k, stage_dir in enumerate(self.dirs) if (beat := _read(stage_dir.rank_heartbeat(rank)))]
            if not found:
                continue
            beat, stage = max(found, key=lambda item: item[0].beat)
            if seen.beat is None or beat.beat != seen.beat.beat:
                seen.beat_at = now
            if seen.beat is None or (stage, beat.step, beat.doing) != seen.place:
                seen.progress_at = now
            seen.beat, seen.stage = beat, stage
            self.slowest_step_s = max(self.slowest_step_s, beat.slowest_step_s or 0.0)

    def allowance(self, seen: _Seen) -> float:
        """Seconds the rank's current work may go without progress."""
        timeout = self.stages[seen.stage].settings.hang_timeout or max(DEFAULT_TIMEOUT_S, STEP_MULTIPLE * self.slowest_step_s)
        return timeout * (LONG_FACTOR if seen.place[2] in LONG_WORK else 1)

    def end_hung_launch(self, allowance_s: float) -> None:
        """Take every rank's stack, write the verdict, end the launch (allowance_s: what the first
        rank found without progress was allowed)."""
        now = time.monotonic()
        stage_dir = self.dirs[max(seen.stage for seen in self.seen.values())]
        records = {}
        for rank_file in stage_dir.rank_records():
            try:
                record = RankRecord.read(rank_file)
                records[record.rank] = record
            except InvalidRecord:
                continue
        stacks = dump_stacks({rank: (record, self._ssh_host(record), stage_dir.rank_log(rank)) for rank, record in records.items()})
        views = {}
        for rank, seen in self.seen.items():
            record = records.get(rank)
            views[rank] = StuckRank(rank=rank, host=seen.beat.host if seen.beat else (record.host if record else None), doing=seen.place[2],
                                    step=seen.place[1], still_s=round(now - seen.progress_at, 1), running=now - seen.beat_at < NOT_BEATING_S,
                                    stack=stacks.get(rank, []))
        stuck = self.stuck_ranks(now)
        verdict = HangRecord(allowance_s=allowance_s, stuck=[views[r] for r in stuck],
                             others=[view for rank, view in views.items() if rank not in stuck], stacks_from=stack_tool())
        try:
            verdict.write(stage_dir.hang)
        except OSError:
            pass  # the launch still ends; the message then says less
        self.stop()

    def stuck_ranks(self, now: float) -> list[int]:
        """The ranks at fault: those not beating, else the furthest behind, else all."""
        silent = [rank for rank, seen in self.seen.items() if seen.beat is None or now - seen.beat_at >= NOT_BEATING_S]
        if silent:
            return silent
        behind = min(seen.place[:2] for seen in self.seen.values())
        return [rank for rank, seen in self.seen.items() if seen.place[:2] == behind]

    def _ssh_host(self, record: RankRecord | None) -> str | None:
        """Where to reach a rank on another node (pdsh launches: hosts by node rank); None: this machine."""
        if record is None or record.host == socket.gethostname() or not self.hosts:
            return None
        return self.hosts[record.node_rank]


def stack_tool() -> str:
    return "py-spy dump" if _py_spy() else f"{STACK_SIGNAL.name} (the rank's faulthandler)"


def _py_spy() -> str | None:
    """py-spy beside this Python (the same path on every node of a cluster), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def dump_stacks(ranks: dict[int, tuple[RankRecord, str | None, Path]]) -> dict[int, list[str]]:
    """Write each rank's Python stack into its log (rank -> (its record, the host to ssh to or None
    for this machine, its log)); return each one's main thread's innermost frames."""
    tool = _py_spy()
    frames = {}
    if tool:
        for rank, (record, ssh_host, log) in ranks.items():
            # --nonblocking: read the stack without pausing the rank (a stopped rank is read as it is).
            text = _run_on(ssh_host, [tool, "dump", "--nonblocking", "--pid", str(record.pid)])
            _append(log, f"\n[harness] hang: rank {rank}'s stack (py-spy dump --pid {record.pid}):\n{text}\n")
            frames[rank] = py_spy_frames(text)
        return frames
    sizes = {rank: log.stat().st_size if log.exists() else 0 for rank, (_, _, log) in ranks.items()}
    for record, ssh_host, _ in ranks.values():
        _run_on(ssh_host, ["kill", f"-{STACK_SIGNAL.name.removeprefix('SIG')}", str(record.pid)])
    time.sleep(STACK_WAIT_S)
    for rank, (_, _, log) in ranks.items():
        try:
            with open(log, errors="replace") as f:
                f.seek(sizes[rank])
                frames[rank] = faulthandler_frames(f.read())
        except OSError:
            frames[rank] = []
    return frames


def _run_on(ssh_host: str | None, command: list[str]) -> str:
    """What a command prints, run here or on ssh_host ('' when it cannot run)."""
    remote = ["ssh", "-o", "BatchMode=yes", ssh_host] if ssh_host else []
    try:
        result = subprocess.run([*remote, *command], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout + result.stderr


def _append(log: Path, text: str) -> None:
    try:
        with open(log, "a") as f:
            f.write(text)
    except OSError:
        pass


def py_spy_frames(text: str) -> list[str]:
    """The main thread's innermost frames of a `py-spy dump`: 'all_reduce (torch/distributed/distributed_c10d.py:2806)'."""
    lines = text.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith("Thread ") and '"MainThread"' in line), None)
    if start is None:
        return []
    frames = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        frames.append(line.strip())
    return frames[:STACK_FRAMES]


FAULTHANDLER_BLOCK = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n((?:  File .*\n?)+)", re.M)
FAULTHANDLER_FRAME = re.compile(r'  File "(.*)", line (\d+) in (.*)')


def faulthandler_frames(text: str) -> list[str]:
    """The innermost frames of the thread faulthandler printed that is not the heartbeat's, as py-spy writes them."""
    blocks = sorted(FAULTHANDLER_BLOCK.finditer(text), key=lambda block: not block[0].startswith("Current"))  # the signalled thread first
    for block in blocks:
        frames = [f"{m[3]} ({m[1]}:{m[2]})" for m in FAULTHANDLER_FRAME.finditer(block[1])]
        if frames and not any("heartbeat.py" in frame for frame in frames):
            return frames[:STACK_FRAMES]
    return []


def _read(path: Path) -> Heartbeat | None:
    try:
        return Heartbeat.read(path)
    except InvalidRecord:
        return None
