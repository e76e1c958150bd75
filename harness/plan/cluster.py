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
    """Nodes every phase runs on, unless a phase sets its own (local: 1)."""
    procs_per_node: int = Field(1, ge=1)
    """GPUs per node (or CPU processes per node)."""
    hostfile: str | None = None
    """DeepSpeed hostfile ('host slots=N' lines, # comments), relative to the plan; pdsh only."""
    hosts: list[HostName] | None = None
    """Host list instead of a hostfile; pdsh only."""
    include: HostSelection | None = None
    """Only these hosts (and slots), passed to the launcher as --include."""
    exclude: HostSelection | None = None
    """Leave out these hosts (and slots), passed to the launcher as --exclude."""
    master_addr: HostName = "127.0.0.1"
    """Address of the first node, where every rank meets (torch.distributed's MASTER_ADDR); inside a
    SLURM allocation the first allocated node's address instead."""
    master_port: int | None = Field(None, ge=1024, le=65535)
    """First port to try; each phase takes the next free one (a reused port stalls init ~30 s)."""
    launcher_args: list[OneLine] = []
    """Extra arguments for the `deepspeed` launcher, passed as given."""
    env: dict[EnvName, ShellWord] = {}
    """Environment for every rank (written to .deepspeed_env for remote nodes). No secrets: the plan
    is copied into the run folder; export them in the shell that runs harness."""
    rank_memory_gb: float | None = Field(None, gt=0)
    """The memory each rank may use, in GB (1e9 bytes): GPU memory on cuda, host memory on cpu. The
    per-rank memory estimate is checked against it (a stage that cannot fit is refused before
    anything runs) and the `auto` settings (zero_stage, offload, activation_checkpointing,
    micro_batch) choose by it. Default: measured where `harness plan` runs: the smallest GPU's memory
    (nvidia-smi) on cuda; MemTotal / procs_per_node on cpu. Set it when the nodes differ from that
    machine (a login node), or to keep a run inside part of a shared machine."""
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
    """W&B project of every stage's run."""
    entity: str | None = None
    """W&B team or user; unset: the API key's default entity."""
    group: str | None = None
    """W&B group that holds every stage's run; default '<run name>-<key>', the key the run folder keeps
    in wandb_id.txt."""
    tags: list[str] = []
    """Tags on every stage's run."""
    log_every: int = Field(1, ge=1)
    """Log every n-th train row to W&B (eval rows and a stage's last row always go)."""
    log_model: bool = False
    """Log each stage's final Hugging Face model folder as an artifact reference."""


class SlurmSpec(Strict):
    """sbatch options for `harness submit`: one job per stage, chained with afterok."""

    partition: SbatchValue | None = None
    """sbatch --partition."""
    account: SbatchValue | None = None
    """sbatch --account."""
    qos: SbatchValue | None = None
    """sbatch --qos."""
    time: SlurmTime = "01:00:00"
    """Time limit per job (sbatch --time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Default: procs_per_node on GPU clusters, none on CPU."""
    cpus_per_task: int | None = Field(None, ge=1)
    """sbatch --cpus-per-task."""
    preempt_grace_s: int = Field(120, ge=10)
    """SLURM sends USR1 this long before the time limit: the ranks checkpoint and the job requeues."""
    max_requeues: int = Field(20, ge=0)
    """How many times a preempted job requeues itself at most (SLURM_RESTART_COUNT)."""
    extra: list[OneLine] = []
    """Further sbatch options, one per item, e.g. "--constraint=h100"."""
