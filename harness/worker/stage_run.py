"""Everything one rank holds for one stage, built once (`StageRun.open`) and closed in a `finally`
(`close`: the W&B run is finished and the engine torn down whatever happened)."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.records import BatchRecord, Progress, RunDir, StageDir
from harness.records.console import eval_summary, stage_prefix
from harness.records.environment import STOP_FILE_VAR
from harness.stages import Stage, StageFile, stage_stores
from harness.worker.adapter import adapted
from harness.worker.batch_probe import batch_shape
from harness.worker.data import TokenizedSet
from harness.worker.evaluate import eval_metrics
from harness.worker.fast import FastPath
from harness.worker import heartbeat
from harness.worker.handoff import Checkpointer, start_point, write_rank_file
from harness.worker.memory import record_memory, watch_end
from harness.worker.metrics import MetricsLog, NullMetrics
from harness.worker.mixture import realised_mix
from harness.worker.model import build_model, build_tokenizer, parameter_storage
from harness.worker.monitor import NullMonitor, start_monitor
from harness.worker.objectives import begin_objectives, open_stage_data, prepare_model
from harness.worker.regularization import NoRegularizer, make_regularizer
from harness.worker.strategy import DeepSpeedStrategy


class StopRequest:
    """"Checkpoint and exit": SIGUSR1, or the stop file the SLURM batch script touches (a signal
    cannot reach ranks that are not SLURM tasks). Checked once per step, on all ranks together."""

    def __init__(self):
        self._signalled = False
        self._file = os.environ.get(STOP_FILE_VAR)
        signal.signal(signal.SIGUSR1, self._ask)

    def _ask(self, signum, frame):
        self._signalled = True

    @property
    def asked(self) -> bool:
        return self._signalled or bool(self._file and os.path.exists(self._file))


@dataclass
class StageRun:
    """One stage on one rank: its engine, model, data, checkpointer, where it stands, and where its
    numbers go (metrics.jsonl and W&B on rank 0, nowhere on the others)."""

    stage: Stage
    dir: StageDir
    strategy: DeepSpeedStrategy
    model: torch.nn.Module
    tokenizer: Any
    sets: dict[str, TokenizedSet]
    batch: BatchRecord
    fast: FastPath
    checkpointer: Checkpointer
    progress: Progress
    regularizer: NoRegularizer
    records: dict[str, Any]
    """The objectives' records for the manifest (RankObjective.begin: a preference stage's reference)."""
    monitor: NullMonitor
    metrics: NullMetrics
    stop: StopRequest

    @classmethod
    def open(cls, stage_file: Path, stop: StopRequest, previous_in_launch: StageDir | None) -> StageRun:
        """Build the stage on this rank: engine, start weights (the previous stage's handoff, or its
        own checkpoint on a resume), data, and its monitor last (nothing after it can fail).
        previous_in_launch: the stage this launch ran just before (its handoff files were checksummed
        as they were written, so they are not read back to be hashed again). Collective."""
        spec = StageFile.read(stage_file)
        stage, resume = spec.stage, spec.resume
        stage_dir = StageDir(stage_file.parent)
        previous = StageDir(Path(spec.previous)) if spec.previous else None

        heartbeat.enter(stage_dir)
        strategy = DeepSpeedStrategy(stage, json.loads(stage_dir.ds_config.read_text()))
        write_rank_file(stage_dir, strategy.rank)
        watch_end(stage_dir, strategy.rank)
        if strategy.is_rank0:
            print(stage_line(stage, resume.mode, resume.tag), flush=True)
        else:
            _send_output_to(stage_dir.rank_log(strategy.rank))

        start = start_point(stage, spec.start, previous, verify_files=previous != previous_in_launch)
        tokenizer = build_tokenizer(stage.model, start.weights_dir)
        fast = FastPath(stage, strategy.is_rank0)

        def probe_model():  # micro_batch auto's throwaway engine: the stage's architecture, weights not read
            model = build_model(stage.model, tokenizer, stage.settings.seed, start.weights_dir, load_weights=False)
            prepare_model(model, tokenizer, stage)
            return adapted(model, stage)

        batch = batch_shape(stage, stage_dir, strategy, probe_model)
        record_memory(stage_dir, strategy.rank, "before_model", stage.memory.estimate if stage.memory else None, **strategy.device_memory())
        # A DeepSpeed checkpoint (full_state, a native or universal resume) overwrites the weights:
        # no need to read them. A consolidated resume builds the model from the tag's fp32 weights.
        if resume.mode == "consolidated":
            model = build_model(stage.model, tokenizer, stage.settings.seed, Path(resume.load_folder))
        else:
            from_checkpoint = start.checkpoint is not None or resume.mode != "fresh"
            model = build_model(stage.model, tokenizer, stage.settings.seed, start.weights_dir, load_weights=not from_checkpoint)
        prepare_model(model, tokenizer, stage)
        fast.prepare_model(model)
        model = adapted(model, stage)
        record_memory(stage_dir, strategy.rank, "model_built", parameters=parameter_storage(model))
        s = stage.settings
        sets = open_stage_data(stage, tokenizer.pad_token_id)
        strategy.setup(model)
        fast.compile(strategy.engine)
        record_memory(stage_dir, strategy.rank, "initialized")
        checkpointer = Checkpointer(stage, stage_dir, strategy)
        progress = checkpointer.restore(start, resume)
        with fast.eager():
            records = begin_objectives(strategy, sets, stage, checkpointer.start_weights_digest, resume.mode == "fresh", batch.micro_batch)
        regularizer = make_regularizer(s.regularization, strategy)
        monitor = start_monitor(stage, RunDir(Path(spec.run_dir)), stage_dir) if strategy.is_rank0 else NullMonitor()
        metrics = MetricsLog(stage_dir.metrics, progress.stage_step, monitor) if strategy.is_rank0 else NullMetrics()
        return cls(stage, stage_dir, strategy, model, tokenizer, sets, batch, fast, checkpointer, progress, regularizer, records, monitor, metrics,
                   stop)

    def evaluate(self) -> dict[str, float]:
        """Every data set's held-out metrics (harness/worker/evaluate.py), run eagerly. Collective."""
        heartbeat.doing("eval")
        with self.fast.eager():
            return eval_metrics(self.strategy, self.sets, self.stage.data.primary, self.tokenizer, self.stage.settings, self.batch.micro_batch)

    def hand_off(self, last_eval: dict[str, float]) -> None:
        """The checkpoint, the Hugging Face model and the manifest (harness/worker/handoff.py). Collective."""
        extra = {"engine_optimizer": type(self.strategy.base_optimizer).__name__, "wandb_run_id": self.monitor.run_id,
                 "regularization": self.regularizer.values(), "trainable": self.checkpointer.trainable_record(), "fast": self.fast.record(),
                 "batch": self.batch, "memory": self.stage.memory, "embedding_resize": self.stage.embedding_resize, **self.records,
                 "data_mix": realised_mix(self.stage, self.sets, stage_stores(self.stage), self.progress) if self.strategy.is_rank0 else {}}
        self.checkpointer.save_handoff(self.progress, last_eval, self.model, self.tokenizer, extra)
        record_memory(self.dir, self.strategy.rank, "end", **self.strategy.device_memory())
        self.monitor.log_model(self.dir.model)
        if self.strategy.is_rank0:
            print(f"{stage_prefix(self.stage.index)}{self.stage.name} done: step {self.progress.global_step}; eval {eval_summary(last_eval)}",
                  flush=True)

    def close(self) -> None:
        """Finish the metrics (and the W&B run: failed when an exception is on its way out), then
        tear the engine down for the next stage of the launch."""
        self.metrics.close()
        self.strategy.close()


def stage_line(stage: Stage, resume_mode: str, resume_tag: str | None) -> str:
    """The line that opens a stage on the console; its prefix also tells the launch side that the
    launch's output from here on belongs to this stage's log (harness/records/console.py)."""
    line = (f"{stage_prefix(stage.index)}{stage.name}: {stage.kind}, ZeRO-{stage.zero_stage}, "
            f"{stage.world_size} rank(s), {stage.optimizer_type}, {stage.steps} steps")
    return line if resume_mode == "fresh" else f"{line}; resumes from {resume_tag} ({resume_mode})"


def _send_output_to(path: Path) -> None:
    """Ranks other than 0 write to their own log, so the console shows rank 0 only."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
