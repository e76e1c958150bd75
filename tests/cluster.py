"""Pytest helpers for the local test cluster started by ``slurm/local-cluster.sh``.

A real N-node SLURM cluster (munge, slurmctld, ``slurmd -N nK`` on 127.0.0.K) plus sshd
on the same loopback addresses, so both DeepSpeed's pdsh launcher and SLURM can be
tested on one machine. Needs root; installs the Debian packages on first use.

Use from a test module (the fixture must be visible to pytest there)::

    from cluster import local_cluster, sbatch, wait_job   # noqa: F401  (tests/ on sys.path)

    def test_two_nodes(local_cluster, tmp_path):
        job = sbatch("--nodes=2", "--wrap", "srun hostname", cwd=tmp_path,
                     env=local_cluster.env())
        assert wait_job(job, 60, env=local_cluster.env()) == "COMPLETED"

or register it once for all tests with ``pytest_plugins = ["cluster"]`` in conftest.py.

Without root, apt-get or working daemons the fixture skips with the reason, unless
HARNESS_REQUIRE_CLUSTER=1 (CI), where it fails instead.

Job state comes from ``scontrol show job -o``: ``sacct`` needs accounting (slurmdbd),
which the local cluster does not run. Finished jobs stay visible for MinJobAge (300 s).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
NODES = 2
DEFAULT_LAB = "/tmp/harness-cluster"

# A job in one of these states is done for good. Everything else (PENDING, RUNNING,
# CONFIGURING, COMPLETING, REQUEUED, SUSPENDED, ...) may still change.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED",
})
# A PENDING job whose dependency failed stays PENDING forever (unless it was submitted
# with --kill-on-invalid-dep=yes): wait_job returns on it and the caller must scancel it.
NEVER_SATISFIED = "DependencyNeverSatisfied"


def _lab() -> str:
    return os.environ.get("LAB", DEFAULT_LAB)


def default_env() -> dict[str, str]:
    """os.environ plus SLURM_CONF of the local cluster when the caller has none."""
    env = dict(os.environ)
    env.setdefault("SLURM_CONF", f"{_lab()}/etc/slurm.conf")
    return env


@dataclass(frozen=True)
class LocalCluster:
    lab: Path
    slurm_env: dict[str, str]                      # add to a process env: SLURM_CONF, PDSH_RCMD_TYPE
    hosts: list[str] = field(default_factory=list)       # ["127.0.0.1", "127.0.0.2"]
    node_names: list[str] = field(default_factory=list)  # ["n1", "n2"]
    started_here: bool = False

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """A full environment for subprocesses: base (default os.environ) + slurm_env + extra."""
        env = dict(os.environ if base is None else base)
        env.update(self.slurm_env)
        env.update(extra)
        return env

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        """Write a DeepSpeed hostfile naming every loopback node."""
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return path


def _script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, LAB=_lab()))


def _unavailable(reason: str):
    if os.environ.get("HARNESS_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"local cluster required (HARNESS_REQUIRE_CLUSTER=1) but unavailable: {reason}")
    pytest.skip(f"local SLURM/ssh cluster unavailable: {reason}")


def _why_not_possible() -> str | None:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (daemons, munge user, sshd on port 22)"
    if not SCRIPT.exists():
        return f"{SCRIPT} missing"
    have = all(shutil.which(b) or Path("/usr/sbin", b).exists()
               for b in ("slurmctld", "slurmd", "sbatch", "munged", "sshd", "pdsh"))
    if not have and not shutil.which("apt-get"):
        return "SLURM/munge/sshd/pdsh not installed and no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def local_cluster():
    """Session-wide 2-node cluster; stopped at the end only if this session started it."""
    reason = _why_not_possible()
    if reason:
        _unavailable(reason)
    already_up = _script("status", timeout=60).returncode == 0
    if not already_up:
        try:
            res = _script("start", str(NODES))
        except subprocess.TimeoutExpired:
            _unavailable("`local-cluster.sh start` timed out")
        if res.returncode != 0:
            _unavailable(f"`local-cluster.sh start {NODES}` exited {res.returncode}: "
                         f"{(res.stderr or res.stdout).strip()[-2000:]}")
    out = _script("env", timeout=60).stdout
    slurm_env = dict(re.findall(r"^export (\w+)=(.*)$", out, flags=re.M))
    cluster = LocalCluster(
        lab=Path(_lab()),
        slurm_env=slurm_env,
        hosts=[f"127.0.0.{i}" for i in range(1, NODES + 1)],
        node_names=[f"n{i}" for i in range(1, NODES + 1)],
        started_here=not already_up,
    )
    try:
        yield cluster
    finally:
        if cluster.started_here:
            _script("stop", timeout=120)


# ----------------------------------------------------------------------------------------
# job helpers (scontrol-based; sacct does not work without accounting)

def _scontrol_job(job_id: str | int, env: dict[str, str] | None) -> dict[str, str] | None:
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                         text=True, env=env or default_env(), timeout=30)
    if res.returncode != 0 or not res.stdout.strip():
        return None                      # unknown job (or purged after MinJobAge)
    line = res.stdout.strip().splitlines()[0]
    # "Key=Value Key=Value ...": split at a space that starts the next Key=, so values
    # that themselves contain '=' (TRES=cpu=2,node=2) stay whole
    parts = re.split(r" (?=[A-Za-z][\w:/.]*=)", line)
    return dict(p.split("=", 1) for p in parts if "=" in p)


def job_field(job_id: str | int, name: str, env: dict[str, str] | None = None) -> str | None:
    """One field of `scontrol show job -o` (JobState, Reason, ExitCode, Restarts, ...), or None."""
    info = _scontrol_job(job_id, env)
    return None if info is None else info.get(name)


def job_state(job_id: str | int, env: dict[str, str] | None = None) -> str | None:
    """JobState (e.g. RUNNING, COMPLETED), or None when slurmctld does not know the job."""
    return job_field(job_id, "JobState", env)


def wait_job(job_id: str | int, timeout: float = 120, env: dict[str, str] | None = None,
             poll: float = 0.2) -> str:
    """Wait until the job is finished; return its final JobState.

    Also returns (with "PENDING") when the job can never start because a dependency
    failed (Reason=DependencyNeverSatisfied): check job_field(job, "Reason") and scancel it.
    A requeued job (REQUEUED/PENDING with Reason=BeginTime) is waited for, not returned.
    Raises TimeoutError (with the last state) after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        info = _scontrol_job(job_id, env)
        if info is not None:
            last = info.get("JobState")
            if last in TERMINAL_STATES:
                return last
            if last == "PENDING" and info.get("Reason") == NEVER_SATISFIED:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {last} after {timeout:.0f} s")
        time.sleep(poll)


def sbatch(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> str:
    """`sbatch --parsable ARGS...`; returns the job id (raises CalledProcessError on error)."""
    res = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                         cwd=cwd, env=env or default_env(), timeout=60, check=True)
    return res.stdout.strip().split(";")[0]


def scancel(*args: str, env: dict[str, str] | None = None) -> None:
    """`scancel ARGS...` (e.g. job id, or "--signal=USR1", "--batch", job id)."""
    subprocess.run(["scancel", *args], env=env or default_env(), timeout=60, check=True)
