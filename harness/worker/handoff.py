"""Checkpoints within a stage and the handoff between stages.

Start of a stage, one of:
- resume:       this stage's own latest DeepSpeed checkpoint (interrupted earlier);
- full_state:   the previous stage's DeepSpeed checkpoint, optimizer moments included,
                when optimizer type, ZeRO family, world size, precision and offload match;
- weights_only: the previous stage's consolidated Hugging Face model;
- init:         the plan's model (first stage).
Native checkpoints do not load across ZeRO-1/2 <-> ZeRO-3 or another world size
(DeepSpeed 0.19.8), hence the rule. Whatever the mode, the weights the stage starts
from are digested and compared with the digest the previous stage saved.

End of a stage, in this order (see DESIGN.md): DeepSpeed checkpoint, Hugging Face
model, manifest.json written last and atomically. The model's fp32 master weights are
gathered one parameter at a time and streamed into (sharded) safetensors by rank 0,
digested on the way; no rank ever holds the whole model. Only the newest
keep_checkpoints complete checkpoints of a stage are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.layout import CHECKPOINT_COMPLETE, StageDir
from harness.manifest import FORMAT_VERSION, read_manifest, sha256_file, write_atomic, write_manifest
from harness.stages import Stage
from harness.worker.model import SafetensorsWriter, hf_weights, save_hf_config
from harness.worker.strategy import DeepSpeedStrategy, WeightsDigest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def handoff_dtype(stage: Stage) -> str:
    """The dtype of the handoff's weight files: the plan's, auto meaning bf16 on GPU, else fp32."""
    chosen = stage.settings.handoff_dtype
    return chosen if chosen != "auto" else ("bf16" if stage.accelerator == "cuda" else "fp32")


def zero_family(stage: int) -> str:
    """Stages whose native checkpoints load into each other."""
    return {0: "zero-0", 1: "zero-1/2", 2: "zero-1/2", 3: "zero-3"}[stage]


@dataclass
class StartPoint:
    """Where a stage's weights (and maybe optimizer state) come from."""

    mode: str
    reason: str
    weights_dir: Path | None = None
    """Hugging Face folder to build the model from (None: the plan's model)."""
    checkpoint: tuple[Path, str] | None = None
    """(folder, tag) of a DeepSpeed checkpoint to load after initialize."""
    previous: dict[str, Any] | None = None
    """The previous stage's manifest."""

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "from": str(self.checkpoint[0] if self.checkpoint else self.weights_dir or "plan")}


@dataclass
class Progress:
    """How far a stage got; saved in every checkpoint and in the manifest."""

    global_step_start: int = 0
    stage_step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    data_position: dict[str, int] = field(default_factory=dict)
    """Samples consumed per data stream (dataset_key), carried from stage to stage."""

    @property
    def global_step(self) -> int:
        return self.global_step_start + self.stage_step


def handoff_start(stage: Stage, previous: StageDir | None) -> StartPoint:
    """How this stage takes over from the previous one (pure apart from reading its manifest)."""
    if previous is None:
        return StartPoint("init", "first stage: weights from the plan's model")
    manifest = read_manifest(previous.manifest)
    blocker = _full_state_blocker(stage, manifest)
    if blocker is None:
        return StartPoint("full_state", f"same optimizer ({stage.optimizer_type}), ZeRO family, world size, precision and offload: optimizer moments carried, fresh scheduler",
                          previous.model, (previous.checkpoints, manifest["checkpoint_tag"]), manifest)
    return StartPoint("weights_only", blocker, previous.model, None, manifest)


def _full_state_blocker(stage: Stage, manifest: dict[str, Any]) -> str | None:
    s = stage.settings
    wanted = {
        "optimizer": (manifest["optimizer"], stage.optimizer_type),
        "ZeRO family": (zero_family(manifest["zero_stage"]), zero_family(s.zero_stage)),
        "world size": (manifest["world_size"], stage.world_size),
        "precision": (manifest["dtype"], stage.precision),
        "offload": (manifest.get("offload"), s.offload.model_dump()),
    }
    for what, (before, now) in wanted.items():
        if before != now:
            return f"{what} changed ({before} -> {now}): weights only, fresh optimizer state"
    return None


class Checkpointer:
    """Saves and loads this stage's checkpoints and writes its handoff."""

    def __init__(self, stage: Stage, stage_dir: StageDir, strategy: DeepSpeedStrategy):
        self.stage = stage
        self.dir = stage_dir
        self.strategy = strategy

    def restore(self, start: StartPoint) -> Progress:
        """After initialize: load what the start point names, check the weights, return progress.
        Writes started.json (rank 0) the first time, so a resume keeps the original handoff record."""
        tag = self.dir.latest_checkpoint()
        if tag is not None:
            state = self.strategy.load_checkpoint(self.dir.checkpoints, tag, with_scheduler=True)
            if self.strategy.is_rank0:
                print(f"[harness] stage {self.stage.name}: resuming from checkpoint {tag}", flush=True)
            return Progress(**state["progress"])
        if start.checkpoint is not None:
            self.strategy.load_checkpoint(*start.checkpoint, with_scheduler=False)
        progress = Progress()
        if start.previous is not None:
            progress.global_step_start = start.previous["global_step_end"]
            progress.data_position = dict(start.previous["data_position"])
        digest = WeightsDigest()
        for name, weight in self.strategy.full_fp32_params():
            digest.update(name, weight)
        weights = digest.hexdigest()
        moments = self.strategy.optimizer_state_digest()
        if start.previous is not None and weights != self._expected_start_digest(start):
            raise RuntimeError(
                f"stage {self.stage.name}: weights after the {start.mode} load do not match what "
                f"{start.record()['from']} saved (digest {weights[:12]} != {start.previous['weights_digest'][:12]})"
            )
        if self.strategy.is_rank0:
            started = {"load": start.record(), "start_weights_digest": weights, "start_optimizer_state_digest": moments, "time": time.time()}
            write_atomic(self.dir.root / "started.json", json.dumps(started, indent=2) + "\n")
        self.strategy.barrier()
        return progress

    def _expected_start_digest(self, start: StartPoint) -> str:
        """full_state: the saved fp32 master digest. weights_only: the digest of what the files
        hold (the master digest when they are fp32), as rounded to this stage's precision when
        lower (the engine's fp32 master copy is made from rounded weights): then streamed from
        the files, one tensor at a time."""
        previous = start.previous
        if start.mode == "full_state":
            return previous["weights_digest"]
        if self.stage.precision == "fp32":
            return previous.get("handoff_weights_digest", previous["weights_digest"])
        digest = WeightsDigest()
        for name, saved in hf_weights(start.weights_dir):
            digest.update(name, saved.to(DTYPES[self.stage.precision]))
        return digest.hexdigest()

    def save(self, progress: Progress) -> str:
        """A DeepSpeed checkpoint, marked complete once every rank has written its part. Collective."""
        tag = f"step{progress.stage_step}"
        self.strategy.save_checkpoint(self.dir.checkpoints, tag, {"progress": asdict(progress)})
        self.strategy.barrier()
        if self.strategy.is_rank0:
            write_atomic(self.dir.checkpoints / tag / CHECKPOINT_COMPLETE, json.dumps(asdict(progress)) + "\n")
            self._drop_old_checkpoints()
        return tag

    def _drop_old_checkpoints(self) -> None:
        """Keep this stage's newest keep_checkpoints complete tags. An older one loses its marker
        first, so a crash midway leaves an incomplete tag, which nothing loads. Tags without a
        marker (a save that was killed) and other stages' checkpoints are never touched."""
        steps = sorted(int(m.parent.name.removeprefix("step")) for m in self.dir.checkpoints.glob(f"step*/{CHECKPOINT_COMPLETE}"))
        for step in steps[: -self.stage.settings.keep_checkpoints]:
            old = self.dir.checkpoints / f"step{step}"
            (old / CHECKPOINT_COMPLETE).unlink()
            shutil.rmtree(old)

    def _write_model(self, model, tokenizer) -> dict[str, Any]:
        """The Hugging Face folder, from the fp32 master weights streamed parameter by parameter
        (collective: every rank takes part in each gather); rank 0 writes the files and digests
        the weights as they pass. Returns the manifest's weight fields (rank 0; {} elsewhere)."""
        weights = self.strategy.full_fp32_params()
        if not self.strategy.is_rank0:
            for _ in weights:
                pass
            return {}
        dtype = handoff_dtype(self.stage)
        folder = self.dir.model
        save_hf_config(folder, model, tokenizer, DTYPES[dtype])
        writer = SafetensorsWriter(folder, self.strategy.full_shapes(), DTYPES[dtype], self.stage.settings.handoff_shard_bytes)
        master = WeightsDigest()
        stored = WeightsDigest() if dtype != "fp32" else None
        for name, weight in weights:
            master.update(name, weight)
            weight = weight.to(DTYPES[dtype])
            if stored is not None:
                stored.update(name, weight)
            writer.add(name, weight)
        writer.close()
        files = {f"{folder.name}/{name}": sha for name, sha in writer.checksums.items()}
        for path in folder.rglob("*"):  # config and tokenizer files: small
            if path.is_file() and path.name not in writer.checksums:
                files[str(path.relative_to(folder.parent))] = sha256_file(path)
        fields = {"handoff_dtype": dtype, "weights_digest": master.hexdigest(), "files": dict(sorted(files.items()))}
        if stored is not None:
            fields["handoff_weights_digest"] = stored.hexdigest()
        return fields

    def save_handoff(self, progress: Progress, eval_metrics: dict[str, float], model, tokenizer, extra: dict[str, Any]) -> None:
        """DeepSpeed checkpoint, then the Hugging Face model, then manifest.json. Collective."""
        tag = f"step{progress.stage_step}"
        if self.dir.latest_checkpoint() != tag:  # a stage resumed at its last step has it already
            self.save(progress)
        moments = self.strategy.optimizer_state_digest()
        weights = self._write_model(model, tokenizer)
        if self.strategy.is_rank0:
            started = json.loads((self.dir.root / "started.json").read_text())
            s = self.stage.settings
            manifest = {
                "format": FORMAT_VERSION,
                "stage": self.stage.name,
                "index": self.stage.index,
                "phase": self.stage.phase,
                "kind": self.stage.kind,
                "zero_stage": s.zero_stage,
                "world_size": self.stage.world_size,
                "dtype": self.stage.precision,
                "offload": s.offload.model_dump(),
                "optimizer": self.stage.optimizer_type,
                "global_step_start": progress.global_step_start,
                "global_step_end": progress.global_step,
                "stage_steps": progress.stage_step,
                "tokens_seen": progress.tokens_seen,
                "samples_seen": progress.samples_seen,
                "data_position": progress.data_position,
                "eval": eval_metrics,
                "load": started["load"],
                "start_weights_digest": started["start_weights_digest"],
                "start_optimizer_state_digest": started["start_optimizer_state_digest"],
                **weights,
                "optimizer_state_digest": moments,
                "checkpoint_tag": tag,
                "finished": time.time(),
                **extra,
            }
            write_manifest(self.dir.manifest, manifest)
        self.strategy.barrier()


def write_rank_file(stage_dir: StageDir, rank: int) -> None:
    """ranks/rank<N>.json: where each rank runs (node rank, host, its pid and its per-node
    launcher's pid), so the launch side can end exactly these processes, and tests can check."""
    stage_dir.ranks.mkdir(parents=True, exist_ok=True)
    # CROSS_RANK: node rank set by deepspeed's launch.py; SLURM_NODEID: under srun.
    node_rank = int(os.environ.get("CROSS_RANK", os.environ.get("SLURM_NODEID", "0")))
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    info = {
        "rank": rank,
        "node_rank": node_rank,
        "host": socket.gethostname(),
        "address": ssh[2] if len(ssh) > 2 else None,
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "pid": os.getpid(),
        "launcher_pid": os.getppid(),
        "time": time.time(),
    }
    write_atomic(stage_dir.ranks / f"rank{rank}.json", json.dumps(info) + "\n")
