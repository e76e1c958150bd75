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
        metrics.jsonl           one JSON line per logged step (rank 0)
        manifest.json           written last, atomically: the stage is done when it is valid
        ranks/                  one file per rank: host and pid, for cleanup and checks
                                (rank<N>.json), its log, memory-rank<N>.json, end-rank<N>.txt
      slurm/                    rendered sbatch scripts and job ids (harness submit)
      wandb/, wandb_id.txt      W&B files and the run's W&B key (one W&B run per stage)
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

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint tag. Not DeepSpeed's `latest` file: DeepSpeed 0.19.8
        writes it before every rank has saved its shard, so a kill can leave it pointing at a
        half-written checkpoint."""
        steps = [int(marker.parent.name.removeprefix("step")) for marker in self.checkpoints.glob(f"step*/{CHECKPOINT_COMPLETE}")]
        return f"step{max(steps)}" if steps else None

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    def rank_log(self, rank: int) -> Path:
        """Where a rank's output goes: rank 0 prints to the launcher's log, the others to their own."""
        return self.launcher_log if rank == 0 else self.ranks / f"rank{rank}.log"

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

    def stage(self, index: int, name: str) -> StageDir:
        """The folder of stage number `index` (0-based) named `name`."""
        return StageDir(self.phases / f"{index:02d}-{name}")

    def stage_dirs(self) -> list[StageDir]:
        """Existing stage folders, in run order."""
        if not self.phases.is_dir():
            return []
        return [StageDir(p) for p in sorted(self.phases.iterdir()) if p.is_dir()]
