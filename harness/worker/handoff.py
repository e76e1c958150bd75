"""Checkpoints within a stage and the handoff between stages.

Start of a stage, one of (each decided on the launch side, carried out here):
- resume:       this stage's own newest intact checkpoint (interrupted earlier), loaded as
                harness/stages/resume.py decided (native, universal, consolidated);
- full_state:   the previous stage's DeepSpeed checkpoint, optimizer moments included,
                when harness/stages/start.py found nothing that moments depend on changed;
- weights_only: the previous stage's consolidated Hugging Face model;
- init:         the plan's model (first stage).
The previous stage's manifest must say what the decision saw. Whatever the mode, the weights
the stage starts from are digested and compared with the digest the previous stage saved,
and the frozen parameters' digest at the start is kept to check they are unchanged at the end.

End of a stage, in this order (see DESIGN.md): DeepSpeed checkpoint, Hugging Face
model, manifest.json written last and atomically (records.Manifest). A checkpoint counts once
rank 0 wrote its completion marker (records.CheckpointRecord: progress, engine settings, every
file's size and xxh3) after every rank saved its part. The model's fp32 master weights are
gathered one parameter at a time and streamed into (sharded) safetensors by rank 0,
digested on the way; no rank ever holds the whole model. Only the newest
keep_checkpoints complete checkpoints of a stage are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.records import (CHECKPOINT_COMPLETE, CheckpointRecord, LoadRecord, Manifest, Progress, RankRecord, ResumePoint, ResumeRecord,
                             StageDir, StartDecision, StartRecord, TrainableRecord, file_check, folder_checks, read_manifest)
from harness.stages import Stage, engine_identity, expected_start_digest
from harness.stages.trainable import trainable_record
from harness.worker.adapter import ADAPTER_CONFIG, base_model, write_adapter_folder
from harness.worker.faults import fault_point
from harness.worker.model import SafetensorsWriter, hf_weights, save_hf_config
from harness.worker.strategy import DeepSpeedStrategy, WeightsDigest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StartPoint:
    """Where a stage's weights (and maybe optimizer state) come from: the launch side's decision
    with the previous stage's folders and manifest."""

    mode: str
    reason: str
    weights_dir: Path | None = None
    """Hugging Face folder to build the model from (None: the plan's model)."""
    checkpoint: tuple[Path, str] | None = None
    """(folder, tag) of a DeepSpeed checkpoint to load after initialize."""
    previous: Manifest | None = None
    """The previous stage's manifest."""
    adapter_base: str | None = None
    """The Hugging Face folder an adapter trained from here applies to (its adapter folder's
    base_model_name_or_path): the start weights', or, when the adapters are carried (full_state),
    the previous stage's adapter base; None for a built-in model."""

    def record(self) -> LoadRecord:
        return LoadRecord(mode=self.mode, reason=self.reason, source=str(self.checkpoint[0] if self.checkpoint else self.weights_dir or "plan"))


def start_point(stage: Stage, decision: StartDecision, previous: StageDir | None, verify_files: bool = True) -> StartPoint:
    """What the launch side's decision loads, once the previous stage's manifest is found to record
    what the decision saw (it is read again here: the stage may have run after stage.json was written).
    verify_files=False: the previous stage ran in this launch and checksummed its files as it
    wrote them; they are not read back (the start weights are still checked against its digest)."""
    if decision.mode == "init":
        return StartPoint(decision.mode, decision.reason, adapter_base=stage.model.path)
    manifest = read_manifest(previous, verify_files)
    found = manifest.engine
    if found != decision.previous:
        raise RuntimeError(f"stage {stage.name}: {previous.manifest} records {found.model_dump()}, but {decision.mode} was decided for "
                           f"{decision.previous.model_dump()}: run `harness run` (or `plan`) again so that the launch side decides anew")
    checkpoint = (previous.checkpoints, manifest.checkpoint_tag) if decision.mode == "full_state" else None
    base = str(previous.model)
    if checkpoint is not None and manifest.engine.adapter is not None:
        base = json.loads((previous.adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return StartPoint(decision.mode, decision.reason, previous.model, checkpoint, manifest, adapter_base=base)


class Checkpointer:
    """Saves and loads this stage's checkpoints and writes its handoff."""

    def __init__(self, stage: Stage, stage_dir: StageDir, strategy: DeepSpeedStrategy):
        self.stage = stage
        self.dir = stage_dir
        self.strategy = strategy

    def restore(self, start: StartPoint, resume: ResumePoint) -> Progress:
        """After initialize: continue from the stage's own checkpoint as `resume` says (decided
        on the launch side), or load what the start point names and check its weights against
        the previous stage's digest. Rank 0 writes started.json the first time and appends each
        resume to it, so the original handoff record is kept. Collective."""
        self._adapter_base = start.adapter_base
        progress = self._resume(resume) if resume.mode != "fresh" else self._start(start)
        self._frozen_at_start = self.strategy.frozen_digest()
        return progress

    @property
    def start_weights_digest(self) -> str:
        """The digest of the weights the stage started from (started.json), also after a resume."""
        return self._start_digest

    def trainable_record(self) -> TrainableRecord:
        """The manifest's record of what trained; raises if a frozen parameter changed. Collective."""
        frozen_now = self.strategy.frozen_digest()
        if frozen_now != self._frozen_at_start:
            raise RuntimeError(f"stage {self.stage.name}: frozen parameters changed during the stage "
                               f"(digest {self._frozen_at_start[:12]} -> {frozen_now[:12]})")
        return trainable_record(self.stage.settings, self.stage.trainable, self.strategy.total_params(), (self._frozen_at_start, frozen_now))

    def _start(self, start: StartPoint) -> Progress:
        """The stage's first start: load what the start point names and check the weights."""
        if start.checkpoint is not None:
            self.strategy.load_checkpoint(*start.checkpoint, with_scheduler=False)
        progress = Progress()
        if start.previous is not None:
            progress.global_step_start = start.previous.global_step_end
            progress.data_position = dict(start.previous.data_position)
        weights = self.strategy.weights_digest()
        moments = self.strategy.optimizer_state_digest()
        if start.previous is not None and weights != self._expected_start_digest(start):
            raise RuntimeError(
                f"stage {self.stage.name}: weights after the {start.mode} load do not match what "
                f"{start.record().source} saved (digest {weights[:12]} != {start.previous.weights_digest[:12]})"
            )
        if self.strategy.is_rank0:
            StartRecord(load=start.record(), start_weights_digest=weights, start_optimizer_state_digest=moments, time=time.time()).write(self.dir.started)
        self._start_digest = weights
        self.strategy.barrier()
        return progress

    def _resume(self, resume: ResumePoint) -> Progress:
        """native and universal: DeepSpeed loads module, optimizer and scheduler state (the
        universal form at another world size); consolidated: the model was built from the
        tag's fp32 weights, so only the schedule moves on to where the tag was."""
        if resume.mode == "consolidated":
            progress = resume.progress
            self.strategy.advance_schedule(progress.stage_step)
        else:
            folder = Path(resume.load_folder) if resume.mode == "universal" else self.dir.checkpoints / resume.tag
            state = self.strategy.load_checkpoint(folder.parent, folder.name, with_scheduler=True)
            progress = Progress.model_validate(state["progress"])
        weights = self.strategy.weights_digest()
        carried = self.strategy.any_rank(any(self.strategy.base_optimizer.state.values()))
        self._start_digest = self.strategy.broadcast_object(StartRecord.read(self.dir.started).start_weights_digest if self.strategy.is_rank0 else None)
        if self.strategy.is_rank0:
            print(f"[harness] stage {self.stage.name}: resuming from checkpoint {resume.tag} ({resume.mode}: {resume.reason})", flush=True)
            started = StartRecord.read(self.dir.started)
            started.resumes.append(ResumeRecord(mode=resume.mode, reason=resume.reason, tag=resume.tag, stage_step=progress.stage_step,
                                                weights_digest=weights, optimizer_state_carried=carried, world_size=self.stage.world_size,
                                                time=time.time()))
            started.write(self.dir.started)
        self.strategy.barrier()
        return progress

    def _expected_start_digest(self, start: StartPoint) -> str:
        """full_state: the saved fp32 master digest. weights_only: the digest of what the files
        hold (the master digest when they are fp32), as rounded to this stage's precision when
        lower (the engine's fp32 master copy is made from rounded weights): then streamed from
        the files, one tensor at a time."""
        expected = expected_start_digest(start.mode, start.previous, self.stage.precision)
        if expected is not None:
            return expected
        digest = WeightsDigest()
        for name, saved in hf_weights(start.weights_dir):
            digest.update(name, saved.to(DTYPES[self.stage.precision]))
        return digest.hexdigest()

    def save(self, progress: Progress) -> str:
        """A DeepSpeed checkpoint, marked complete once every rank has written its part. Collective."""
        tag = f"step{progress.stage_step}"
        self.strategy.save_checkpoint(self.dir.checkpoints, tag, {"progress": progress.model_dump()})
        fault_point(self.stage, self.strategy.rank, "save")
        self.strategy.barrier()
        folder = self.dir.checkpoints / tag
        # Each rank checksums the files it wrote (their names carry the rank), while they are in its page cache.
        mine = {rel: check.model_dump() for rel, check in folder_checks(folder, folder, lambda name: _writer_rank(name) == self.strategy.rank).items()}
        files = {rel: check for part in self.strategy.all_gather_object(mine) for rel, check in part.items()}
        if self.strategy.is_rank0:
            record = CheckpointRecord(progress=progress, engine=engine_identity(self.stage), files=files)
            record.write(folder / CHECKPOINT_COMPLETE)
            self._drop_old_checkpoints()
        return tag

    def _drop_old_checkpoints(self) -> None:
        """Keep this stage's newest keep_checkpoints complete tags. An older one loses its marker
        first, so a crash midway leaves an incomplete tag, which nothing loads. Tags without a
        marker (a save that was killed) and other stages' checkpoints are never touched."""
        for tag in self.dir.checkpoint_tags()[self.stage.settings.keep_checkpoints:]:
            old = self.dir.checkpoints / tag
            (old / CHECKPOINT_COMPLETE).unlink()
            shutil.rmtree(old)

    def _write_model(self, model, tokenizer) -> dict[str, Any]:
        """The Hugging Face folder, from the fp32 master weights streamed parameter by parameter
        (collective: every rank takes part in each gather); rank 0 writes the files and digests
        the weights as they pass. Returns the manifest's weight fields (rank 0; {} elsewhere)."""
        adapter_tensors: dict[str, torch.Tensor] = {}
        weights = self.strategy.model_weights(adapter_tensors)
        if not self.strategy.is_rank0:
            for _ in weights:
                pass
            return {}
        dtype = self.stage.handoff_dtype
        folder = self.dir.model
        save_hf_config(folder, base_model(model), tokenizer, DTYPES[dtype])
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
        files = {f"{folder.name}/{name}": check for name, check in writer.checksums.items()}
        if self.strategy.adapter is not None:
            checks = write_adapter_folder(self.dir.adapter, model, adapter_tensors, base=self._adapter_base)
            files.update({f"{self.dir.adapter.name}/{name}": check for name, check in checks.items()})
        for path in folder.rglob("*"):  # config and tokenizer files: small
            if path.is_file() and path.name not in writer.checksums:
                files[str(path.relative_to(folder.parent))] = file_check(path)
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
        fault_point(self.stage, self.strategy.rank, "handoff")
        self.strategy.barrier()  # every rank's part of the handoff is done before the manifest says so
        if self.strategy.is_rank0:
            started = StartRecord.read(self.dir.started)
            manifest = Manifest(
                stage=self.stage.name,
                index=self.stage.index,
                phase=self.stage.phase,
                kind=self.stage.kind,
                engine=engine_identity(self.stage),
                global_step_start=progress.global_step_start,
                global_step_end=progress.global_step,
                stage_steps=progress.stage_step,
                tokens_seen=progress.tokens_seen,
                samples_seen=progress.samples_seen,
                data_position=progress.data_position,
                eval=eval_metrics,
                load=started.load,
                resumes=started.resumes,
                start_weights_digest=started.start_weights_digest,
                start_optimizer_state_digest=started.start_optimizer_state_digest,
                optimizer_state_digest=moments,
                checkpoint_tag=tag,
                finished=time.time(),
                **weights,
                **extra,
            )
            manifest.write(self.dir.manifest)
        self.strategy.barrier()
        fault_point(self.stage, self.strategy.rank, "manifest")  # after the barrier: on every rank, the manifest is written


def _writer_rank(name: str) -> int:
    """The rank that wrote a DeepSpeed checkpoint file: 'zero_pp_rank_3_mp_rank_00_optim_states.pt'
    -> 3; files shared by all ranks ('mp_rank_00_model_states.pt') are rank 0's."""
    match = re.search(r"(?:^|_)pp_rank_(\d+)_", name)
    return int(match.group(1)) if match else 0


def write_rank_file(stage_dir: StageDir, rank: int) -> None:
    """ranks/rank<N>.json: where each rank runs (node rank, host, its pid and its per-node
    launcher's pid), so the launch side can end exactly these processes, and tests can check."""
    stage_dir.ranks.mkdir(parents=True, exist_ok=True)
    # CROSS_RANK: node rank set by deepspeed's launch.py; SLURM_NODEID: under srun.
    node_rank = int(os.environ.get("CROSS_RANK", os.environ.get("SLURM_NODEID", "0")))
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    RankRecord(
        rank=rank,
        node_rank=node_rank,
        host=socket.gethostname(),
        address=ssh[2] if len(ssh) > 2 else None,
        slurm_node=os.environ.get("SLURMD_NODENAME"),
        pid=os.getpid(),
        launcher_pid=os.getppid(),
        time=time.time(),
    ).write(stage_dir.rank_record(rank))
