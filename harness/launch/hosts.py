"""Which hosts a stage runs on: the plan's hostfile or host list, or the SLURM allocation; and
how many GPUs this machine has, and how much memory. Never imports torch."""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from harness.launch.slurm import scontrol, scontrol_fields
from harness.plan.hostfile import hostfile_hosts, hostfile_text
from harness.records import StageDir
from harness.stages import Stage
from harness.stages.fit import MachineMemory


def hostfile_path(stage: Stage, stage_dir: StageDir) -> str | None:
    """The plan's hostfile, or the one the stage writes (from the host list or the SLURM allocation)."""
    if stage.cluster.launcher == "local":
        return None
    if stage.cluster.hostfile and "SLURM_JOB_NODELIST" not in os.environ:
        return stage.cluster.hostfile
    return str(stage_dir.hostfile)


def resolve_hosts(stage: Stage, stage_dir: StageDir) -> tuple[str | None, list[str], str]:
    """(hostfile, hosts in node-rank order, master address) for this launch. Inside a SLURM
    allocation they come from SLURM_JOB_NODELIST, rank 0 on the first node, at its NodeAddr."""
    cluster = stage.cluster
    hostfile = hostfile_path(stage, stage_dir)
    if hostfile is None:
        return None, [], cluster.master_addr
    if "SLURM_JOB_NODELIST" in os.environ:
        hosts = scontrol("show", "hostnames", os.environ["SLURM_JOB_NODELIST"]).split()
        Path(hostfile).write_text(hostfile_text(hosts, stage.procs_per_node))
        return hostfile, hosts, _node_address(hosts[0])
    if cluster.hosts:
        Path(hostfile).write_text(hostfile_text(cluster.hosts, stage.procs_per_node))
    return hostfile, hostfile_hosts(Path(hostfile).read_text()), cluster.master_addr


@functools.cache  # asked for the accelerator and for the local launch's rank count: run it once
def local_gpu_count() -> int | None:
    """The GPUs `nvidia-smi -L` lists on this machine; None when it cannot be run."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def _node_address(node: str) -> str:
    """A SLURM node's NodeAddr (its name need not resolve, e.g. on a test cluster)."""
    return scontrol_fields(scontrol("show", "node", "-o", node)).get("NodeAddr", node)


@functools.cache
def machine_memory() -> MachineMemory:
    """This machine's memory, which the memory estimate is checked against (harness/stages/fit.py):
    the smallest GPU's total memory (`nvidia-smi --query-gpu=memory.total`, MiB), and MemTotal."""
    gpu = None
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        sizes = [int(line) for line in listing.stdout.split() if line.strip().isdigit()]
        gpu = min(sizes) * 2**20 if listing.returncode == 0 and sizes else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    host = None
    try:
        host = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return MachineMemory(gpu_bytes=gpu, host_bytes=host)
