"""Where a run keeps its files. Every part of the harness finds paths here.

    <out>/
      plan.yaml                 the plan as submitted (copied on first run)
      plan.sha256               its digest: a changed plan is refused without --force
      metrics.jsonl             every stage's metrics.jsonl in run order (rebuilt after each stage)
      phases/<NN>-<stage>/      one folder per stage (a multistep phase has several)
        stage.json              the resolved stage the worker reads
        ds_config.json          the DeepSpeed config generated for it
        command.txt             the exact launcher command
        launcher.log            everything the launcher printed
        checkpoints/            DeepSpeed checkpoints (tags "step<N>"), for resuming this stage;
                                a tag counts once rank 0 wrote step<N>/complete after every rank saved
        model/                  consolidated Hugging Face model: the handoff to the next stage
                                (with an adapter: the base merged with it)
        adapter/                an adapter stage's peft adapter folder (PeftModel.from_pretrained)
        metrics.jsonl           one JSON line per logged step (rank 0)
        started.json            how the stage started (load mode, start digests), and each resume
        manifest.json           written last, atomically: the stage is done when it is valid
        hostfile                the hosts of a pdsh/SLURM launch (from the plan's host list or the allocation)
        .deepspeed_env          variables the launcher passes to remote ranks (no secrets; 0600)
        ranks/                  one file per rank: host and pid, for cleanup and checks
                                (rank<N>.json), its log, memory-rank<N>.json, end-rank<N>.txt
      slurm/                    rendered sbatch scripts, their stop files and logs, and jobs.json (harness submit)
      wandb/, wandb_id.txt      W&B files and the run's W&B key (one W&B run per stage)
      report.png, report.json   `harness report`: curves and the table
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


CHECKPOINT_COMPLETE = "complete"


@dataclass(frozen=True)
class StageDir:
    """Paths of one stage's folder."""

    root: Path

    @property
    def index(self) -> int:
        """The stage's number: the folder is named '<NN>-<stage name>' (RunDir.stage)."""
        return int(self.root.name.split("-", 1)[0])

    @property
    def name(self) -> str:
        """The stage's name (it may itself contain '-')."""
        return self.root.name.split("-", 1)[1]

    @property
    def stage_json(self) -> Path:
        return self.root / "stage.json"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def command(self) -> Path:
        return self.root / "command.txt"

    @property
    def launcher_log(self) -> Path:
        return self.root / "launcher.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_tags(self) -> list[str]:
        """Tags "step<N>" with a completion marker, newest first. Not DeepSpeed's `latest` file:
        DeepSpeed 0.19.8 writes it before every rank has saved its shard, so a kill can leave it
        pointing at a half-written checkpoint."""
        steps = [name.removeprefix("step") for name in (marker.parent.name for marker in self.checkpoints.glob(f"step*/{CHECKPOINT_COMPLETE}"))]
        return [f"step{step}" for step in sorted((int(s) for s in steps if s.isdigit()), reverse=True)]

    def latest_checkpoint(self) -> str | None:
        """The newest tag with a completion marker (harness/stages/resume.py checks that its files are intact)."""
        return next(iter(self.checkpoint_tags()), None)

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def adapter(self) -> Path:
        """An adapter stage's adapter folder (peft's adapter_config.json + adapter_model.safetensors)."""
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def micro_batch(self) -> Path:
        """The micro batch a micro_batch auto probe chose (records.BatchRecord)."""
        return self.root / "micro_batch.json"

    @property
    def started(self) -> Path:
        return self.root / "started.json"

    @property
    def hostfile(self) -> Path:
        return self.root / "hostfile"

    @property
    def deepspeed_env(self) -> Path:
        return self.root / ".deepspeed_env"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    def rank_log(self, rank: int) -> Path:
        """Where a rank's output goes: rank 0 prints to the launcher's log, the others to their own."""
        return self.launcher_log if rank == 0 else self.ranks / f"rank{rank}.log"

    def rank_record(self, rank: int) -> Path:
        """Where the rank runs (host, pid, its launcher's pid), written when it starts."""
        return self.ranks / f"rank{rank}.json"

    def rank_records(self) -> list[Path]:
        """The rank records of the latest launch (each launch starts with an empty ranks/)."""
        return sorted(self.ranks.glob("rank*.json"))

    def rank_memory(self, rank: int) -> Path:
        """The rank's peak and current RSS at its last milestone (harness/worker/memory.py)."""
        return self.ranks / f"memory-rank{rank}.json"

    def rank_end(self, rank: int) -> Path:
        """How the rank ended, written by the rank itself: 'exit', or the stack at SIGTERM or a
        fatal error. Empty when it was SIGKILLed (nothing can run then)."""
        return self.ranks / f"end-rank{rank}.txt"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's output folder."""

    root: Path

    @property
    def plan_copy(self) -> Path:
        return self.root / "plan.yaml"

    @property
    def plan_digest(self) -> Path:
        return self.root / "plan.sha256"

    @property
    def phases(self) -> Path:
        return self.root / "phases"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_jobs(self) -> Path:
        """The submitted jobs and their ids."""
        return self.slurm / "jobs.json"

    def slurm_script(self, job: str) -> Path:
        return self.slurm / f"{job}.sbatch"

    def slurm_stop(self, job: str) -> Path:
        """Touched by the batch script on SIGUSR1: the ranks checkpoint and exit."""
        return self.slurm / f"{job}.stop"

    def slurm_log(self, job: str) -> Path:
        return self.slurm / f"{job}-%j.out"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def report_json(self) -> Path:
        """`harness report`'s table rows."""
        return self.root / "report.json"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def wandb_key(self) -> Path:
        """A random token written once: W&B run ids and the group derive from it."""
        return self.root / "wandb_id.txt"

    def stage(self, index: int, name: str) -> StageDir:
        """The folder of stage number `index` (0-based) named `name`."""
        return StageDir(self.phases / f"{index:02d}-{name}")

    def stage_dirs(self) -> list[StageDir]:
        """Existing stage folders, in run order."""
        if not self.phases.is_dir():
            return []
        return [StageDir(p) for p in sorted(self.phases.iterdir()) if p.is_dir()]
