"""One launch's process group: start it, stream its output, stop it and its ranks.

A launch runs one stage, or a group of stages whose ranks swap the engine in place
(stages.launch_groups). Each launch is its own `deepspeed` launcher in its own process group
with a fresh master port (reusing a port right after the previous launch stalled init ~30 s).
Never imports torch; never ends a process it did not start.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from harness.launch.command import (deepspeed_binary, deepspeed_env_file, launcher_command, launcher_environment, rank_environment,
                                    shell_quote, split_secrets)
from harness.launch.hosts import resolve_hosts
from harness.launch.watchdog import HangWatch
from harness.plan import default_cache_dir
from harness.records import RankRecord, StageDir, write_atomic
from harness.records.console import PREFIX, STAGE_LINE
from harness.records.environment import SECRETS_FILE_VAR
from harness.stages import Stage


def first_port(stage: Stage) -> int:
    """The first master port tried for a stage; `run` takes the first free one from here."""
    return (stage.cluster.master_port or 29500) + stage.index


def free_port(start: int) -> int:
    """The first port from `start` that nothing listens on and nothing holds in TIME_WAIT."""
    port = next((port for port in range(start, start + PORT_SPAN) if _bindable(port)), None)
    if port is None:
        raise RuntimeError(f"no free port in {start}..{start + PORT_SPAN - 1}")
    return port


PORT_SPAN = 200
PORT_LOCKS = Path(tempfile.gettempdir()) / "harness-ports"
"""One lock file per master port a launch on this machine holds (every user's: the folder is shared)."""


@contextmanager
def reserved_port(start: int) -> Iterator[int]:
    """The first port from `start` that no other harness launch on this machine holds and that is
    free, held for the length of the `with`. Checking that a port is free does not keep it free
    until the ranks bind it (seconds later): two runs started together picked the same port and one
    died with EADDRINUSE. Each launch locks its port's file in PORT_LOCKS (flock: the lock ends with
    the process, however it ends), so another launch takes the next port."""
    try:
        PORT_LOCKS.mkdir(mode=0o1777)
        PORT_LOCKS.chmod(0o1777)  # mkdir's mode is cut by the umask; sticky: nobody removes another's files
    except FileExistsError:
        pass
    for port in range(start, start + PORT_SPAN):
        lock = os.open(PORT_LOCKS / f"{port}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            continue
        if not _bindable(port):
            os.close(lock)
            continue
        try:
            yield port
        finally:
            os.close(lock)
        return
    raise RuntimeError(f"no free port in {start}..{start + PORT_SPAN - 1}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def launch_group(stages: list[Stage], stage_dirs: list[StageDir], verbose: bool = False) -> int:
    """Start one launch for `stages` (one stage, or a group whose ranks swap the engine in place) in
    its own process group, stream its output, return its exit code. Each stage's lines go to its
    own launcher.log; the console shows the harness's own lines (`verbose`: everything). Ctrl-C or
    SIGTERM stops the launch and every rank it started (and nothing else), then re-raises."""
    first, first_dir = stages[0], stage_dirs[0]
    hostfile, hosts, master_addr = resolve_hosts(first, first_dir)
    with ExitStack() as held:
        port = held.enter_context(reserved_port(first_port(first)))
        argv = launcher_command(first, stage_dirs, master_addr, port, deepspeed_binary(sys.executable), hostfile)
        rank_env = {**rank_environment(first, dict(os.environ), master_addr, port), "WANDB_MODE": first.wandb_mode}
        _, secrets = split_secrets(rank_env)
        # pdsh ranks get only what the launcher prints on its logged command line: their secrets wait
        # in a private file for the length of the launch. Other ranks inherit the launcher's environment.
        secrets_file = held.enter_context(_secrets_file(secrets if first.cluster.launcher == "pdsh" else {}))
        if secrets_file:
            rank_env[SECRETS_FILE_VAR] = secrets_file
        for stage_dir in stage_dirs:
            stage_dir.command.write_text(shell_quote(argv) + "\n")
            shutil.rmtree(stage_dir.ranks, ignore_errors=True)  # rank files of an earlier attempt
            write_atomic(stage_dir.deepspeed_env, deepspeed_env_file(rank_env), mode=0o600)
        env = {**launcher_environment(first.cluster.launcher, dict(os.environ), rank_env), "DS_ENV_FILE": str(first_dir.deepspeed_env)}
        return _run_launcher(argv, env, stages, stage_dirs, hosts, verbose)


def _run_launcher(argv: list[str], env: dict[str, str], stages: list[Stage], stage_dirs: list[StageDir], hosts: list[str], verbose: bool) -> int:
    with ExitStack() as files:
        # Unbuffered: on a full disk a write fails at once and nothing is left to fail at close.
        logs = {stage.index: files.enter_context(open(d.launcher_log, "ab", buffering=0)) for stage, d in zip(stages, stage_dirs)}
        header = f"\n[harness] {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_quote(argv)}\n".encode()
        for log in logs.values():
            _to_log(log, header)
        process = subprocess.Popen(argv, cwd=stage_dirs[0].root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with HangWatch(stages, stage_dirs, hosts, stop=lambda: stop_launch(process, stages[0], stage_dirs, hosts)):
                _stream(process, logs, verbose)
                return process.wait()
        except KeyboardInterrupt:
            stop_launch(process, stages[0], stage_dirs, hosts)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_term)


def secrets_dir() -> Path:
    """Where pdsh launches keep their secrets files: under the home folder, which remote nodes
    must see (or XDG_CACHE_HOME, set to a folder they see), never in the run folder."""
    return default_cache_dir() / "secrets"


@contextmanager
def _secrets_file(secrets: dict[str, str]) -> Iterator[str | None]:
    """A JSON file of the secrets that only the user can read, for the length of the `with`
    (also on Ctrl-C or a failure); None when there are no secrets."""
    if not secrets:
        yield None
        return
    folder = secrets_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="launch-", suffix=".json", dir=folder)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(secrets, f)
        yield path
    finally:
        os.unlink(path)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


SEGMENT_END = re.compile(rb"[\r\n]")


def _stream(process: subprocess.Popen, logs: dict[int, BinaryIO], verbose: bool) -> None:
    """Copy the launcher's output into the log of the stage it is about, line by line (a progress
    bar's \\r-separated refreshes count as lines). The console gets the harness's own lines
    ("[harness] ...", progress bars included); DeepSpeed's INFO lines and warnings stay in the log."""
    out = sys.stdout.buffer
    log = next(iter(logs.values()))
    pending, bar_open = b"", False
    fd = process.stdout.fileno()
    while chunk := os.read(fd, 65536):
        pending += chunk
        start = 0
        for end in SEGMENT_END.finditer(pending):
            segment = pending[start:end.end()]
            start = end.end()
            stage = STAGE_LINE.match(segment)
            if stage and int(stage.group(1)) in logs:
                log = logs[int(stage.group(1))]
            _to_log(log, segment)
            # A closing progress bar's own line end counts as the harness's (the bar ends in \r).
            if verbose or segment.startswith(PREFIX.encode()) or (bar_open and segment in (b"\r", b"\n")):
                out.write(segment)
                bar_open = segment.endswith(b"\r")
        pending = pending[start:]
        out.flush()
    _to_log(log, pending)
    if verbose or pending.startswith(PREFIX.encode()):
        out.write(pending)
        out.flush()


def _to_log(log: BinaryIO, data: bytes) -> None:
    """A full disk must not end the streaming: the console still shows the harness's lines."""
    try:
        log.write(data)
    except OSError:
        pass


def stop_launch(process: subprocess.Popen, stage: Stage, stage_dirs: list[StageDir], hosts: list[str], grace_s: float = 10.0) -> None:
    """End a launch: the launcher's process group, then any rank still alive, by the PID it recorded
    in the folder of any stage of the launch.

    DeepSpeed's pdsh runner answers SIGTERM by running `pkill -f` on every host (0.19.8), which
    can kill other people's runs: it gets SIGKILL, and its remote ranks are ended over ssh.
    The single-node runner leaves its ranks running on SIGTERM: its whole group is signalled."""
    if stage.cluster.launcher == "pdsh":
        _signal_group(process, signal.SIGKILL)
    else:
        _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        _signal_group(process, signal.SIGKILL)
    process.wait()
    for stage_dir in stage_dirs:
        end_ranks(stage_dir, hosts if stage.cluster.launcher == "pdsh" else [])


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def end_ranks(stage_dir: StageDir, hosts: list[str]) -> None:
    """SIGKILL each rank of this stage and its per-node launcher, by the PIDs the ranks recorded,
    only if that PID still runs this stage (its command line names this stage's stage.json).
    Ranks of node k are reached over ssh at hosts[k]; with no hosts, on this machine."""
    marker = shlex.quote(str(stage_dir.stage_json))
    for rank_file in stage_dir.rank_records():
        rank = RankRecord.read(rank_file)
        kills = " ; ".join(
            f"tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -qF -- {marker} && kill -KILL {pid}"
            for pid in (rank.launcher_pid, rank.pid)
        )
        command = ["bash", "-c", kills + " ; true"]
        if hosts:
            command = ["ssh", "-o", "BatchMode=yes", hosts[rank.node_rank], kills + " ; true"]
        subprocess.run(command, capture_output=True, timeout=30)
