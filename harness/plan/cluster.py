"""Where a plan runs: the cluster and launcher, SLURM's sbatch options, Weights & Biases."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.plan.fields import EnvName, HostName, HostSelection, OneLine, SbatchValue, ShellWord, SlurmTime, Strict

class ClusterSpec(Strict):
    """Where the phases run and how the `deepspeed` launcher reaches the nodes."""

    launcher: Literal["local", "pdsh", "slurm"] = "local"
    """local: one node; pdsh: hostfile over ssh; slurm: inside a SLURM allocation."""
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when `nvidia-smi -L` lists a GPU, else cpu (DS_ACCELERATOR=cpu, gloo)."""
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1)
    """GPUs per node (or CPU processes per node)."""
    hostfile: str | None = None
    """DeepSpeed hostfile ('host slots=N' lines, # comments), relative to the plan; pdsh only."""
    hosts: list[HostName] | None = None
    """Host list instead of a hostfile; pdsh only."""
    include: HostSelection | None = None
    exclude: HostSelection | None = None
    master_addr: HostName = "127.0.0.1"
    master_port: int | None = Field(None, ge=1024, le=65535)
    """First port to try; each phase takes the next free one (a reused port stalls init ~30 s)."""
    launcher_args: list[OneLine] = []
    """Extra arguments for the `deepspeed` launcher, passed as given."""
    env: dict[EnvName, ShellWord] = {}
    """Environment for every rank (written to .deepspeed_env for remote nodes). No secrets: the plan
    is copied into the run folder; export them in the shell that runs harness."""
    transitions: Literal["swap", "relaunch"] = "swap"
    """swap: consecutive stages on the same nodes and ranks per node share one launch; the running
    ranks hand off, tear the engine down and build the next stage's engine (seconds instead of a
    relaunch). relaunch: a fresh `deepspeed` launch for every stage."""



class WandbSpec(Strict):
    """Weights & Biases logging: one W&B run per stage, all in one group."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: WANDB_MODE if set, else online when an API key is configured (WANDB_API_KEY or
    `wandb login`), else offline."""
    project: str = "harness"
    entity: str | None = None
    group: str | None = None
    """Default: '<run name>-<run id>'."""
    tags: list[str] = []
    log_every: int = Field(1, ge=1)
    log_model: bool = False
    """Log each stage's final Hugging Face model folder as an artifact reference."""


class SlurmSpec(Strict):
    """sbatch options for `harness submit`: one job per stage, chained with afterok."""

    partition: SbatchValue | None = None
    account: SbatchValue | None = None
    qos: SbatchValue | None = None
    time: SlurmTime = "01:00:00"
    """Time limit per job (sbatch --time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Default: procs_per_node on GPU clusters, none on CPU."""
    cpus_per_task: int | None = Field(None, ge=1)
    preempt_grace_s: int = Field(120, ge=10)
    """SLURM sends USR1 this long before the time limit: the ranks checkpoint and the job requeues."""
    max_requeues: int = Field(20, ge=0)
    extra: list[OneLine] = []
    """Further sbatch options, one per item, e.g. "--constraint=h100"."""
