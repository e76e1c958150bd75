"""This rank's heartbeat: ranks/heartbeat-rank<N>.json in the folder of the stage it is in, saying
what it is doing (records.Heartbeat), rewritten once a second by a thread of its own. The launch
side (harness/launch/watchdog.py) reads from it whether the rank runs at all (the beat count moves
even while the main thread waits inside a collective) and whether it makes progress (what it does
changes). The loop and the stage's parts only say what they begin: `doing("eval")`,
`doing("step", 12)`; the rank's first step of a stage is "first step" (it compiles).

Also registered here: records.STACK_SIGNAL makes faulthandler print every thread's stack to the
rank's log, from its C signal handler, so even a main thread blocked in a collective shows where
it is (the watchdog's way when py-spy is not installed).

No torch: it starts before the worker imports anything heavy. Writes are a plain rename without
fsync (a lost heartbeat costs nothing) and never raise (a full disk must not end the rank here).
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time

from harness.records import STACK_SIGNAL, Heartbeat, StageDir

INTERVAL_S = 1.0


class _Beat:
    """What this rank does, and the thread that writes it down every INTERVAL_S."""

    def __init__(self, stage_dir: StageDir, rank: int):
        self.rank, self.host, self.pid = rank, socket.gethostname(), os.getpid()
        self.stage_dir = stage_dir
        self.doing, self.step, self.beat = "starting", 0, 0
        self.slowest: float | None = None
        self._first_step_done = False

    def run(self) -> None:
        while True:
            self.write()
            time.sleep(INTERVAL_S)

    def write(self) -> None:
        self.beat += 1
        record = Heartbeat(rank=self.rank, host=self.host, pid=self.pid, doing=self.doing, step=self.step, beat=self.beat, time=time.time(),
                           slowest_step_s=self.slowest)
        path = self.stage_dir.rank_heartbeat(self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(record.model_dump_json())
            os.replace(tmp, path)
        except OSError:
            pass


_beat: _Beat | None = None


def start(stage_dir: StageDir, rank: int) -> None:
    """Begin beating for this rank ("starting"), and answer STACK_SIGNAL with every thread's stack."""
    global _beat
    _beat = _Beat(stage_dir, rank)
    stage_dir.ranks.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_beat.run, name="harness-heartbeat", daemon=True).start()
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def enter(stage_dir: StageDir) -> None:
    """The next stage of the launch begins ("building"): the heartbeat moves into its folder."""
    if _beat is not None:
        _beat.stage_dir, _beat.slowest, _beat._first_step_done = stage_dir, None, False
        doing("building", 0)


def doing(what: str, step: int | None = None) -> None:
    """This rank begins `what` (at `step`, else at the step it is at); a step's first is "first step"."""
    if _beat is None:
        return
    if what == "step" and not _beat._first_step_done:
        what, _beat._first_step_done = "first step", True
    _beat.doing, _beat.step = what, _beat.step if step is None else step


def step_took(seconds: float) -> None:
    """A step ended after `seconds`: the slowest so far, the first step of the stage excepted."""
    if _beat is not None and _beat.doing == "step":
        _beat.slowest = max(_beat.slowest or 0.0, seconds)
