"""The stages of one launch on one rank, one after the other: set up, train, hand off, tear the
engine down. The loop reads top to bottom: step, log, eval, checkpoint, stop-if-asked.

SIGUSR1 (SLURM preemption or time limit) makes every rank finish the current
step, save a checkpoint and exit with PREEMPTED; a rerun resumes there.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from harness.console import eval_summary, stage_line
from harness.layout import RunDir, StageDir
from harness.exit_codes import PREEMPTED
from harness.stages import Stage
from harness.token_store import stage_stores
from harness.worker.data import SampleStream, TokenizedSet, micro_batch_position, open_set, token_count
from harness.worker.batch_probe import batch_shape
from harness.worker.evaluate import eval_metrics
from harness.records import BatchRecord, Progress, StageFile
from harness.worker.fast import FastPath
from harness.worker.faults import fault_point
from harness.worker.handoff import Checkpointer, start_point, write_rank_file
from harness.worker.memory import record_exit, record_memory, reset_peak, watch_end
from harness.worker.metrics import MetricsLog, NullMetrics
from harness.worker.monitor import NullMonitor, start_monitor
from harness.worker.model import build_model, build_tokenizer, parameter_storage, prepare_for_data
from harness.worker.regularization import NoRegularizer, make_regularizer
from harness.worker.strategy import DeepSpeedStrategy, exit_launch, release_memory


class StopRequest:
    """"Checkpoint and exit": SIGUSR1, or the stop file the SLURM batch script touches (a signal
    cannot reach ranks that are not SLURM tasks). Checked once per step, on all ranks together."""

    def __init__(self):
        self._signalled = False
        self._file = os.environ.get("HARNESS_STOP_FILE")
        signal.signal(signal.SIGUSR1, self._ask)

    def _ask(self, signum, frame):
        self._signalled = True

    @property
    def asked(self) -> bool:
        return self._signalled or bool(self._file and os.path.exists(self._file))


class BarOutput:
    """tqdm writes each refresh as '\r' + bar; this writes bar + '\r' instead, so every refresh is a
    whole line to the launch side (processes._stream shows "[harness] ..." lines on the console)
    and a warning printed next cannot end up inside it. The terminal shows the same."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text[1:] + "\r" if text.startswith("\r") else text)

    def flush(self) -> None:
        self.out.flush()


def run_launch(stage_files: list[Path]) -> None:
    """Every stage of this launch, in order, on this rank; ends the process: 0 when every stage is
    done, PREEMPTED when asked to stop. Between stages the engine is torn down and the next stage
    builds its own from the handoff just written (the same contract as a relaunch)."""
    stop = StopRequest()
    previous_in_launch: StageDir | None = None
    for stage_file in stage_files:
        code = run_stage(stage_file, stop, previous_in_launch)
        if code != 0:
            record_exit()
            exit_launch(code)
        release_memory()
        reset_peak()
        previous_in_launch = StageDir(stage_file.parent)
    record_exit()
    exit_launch(0)


def run_stage(stage_file: Path, stop: StopRequest, previous_in_launch: StageDir | None = None) -> int:
    """Everything one rank does for one stage; returns 0, or PREEMPTED when stopped early.
    previous_in_launch: the stage this launch ran just before (its handoff files were checksummed
    as they were written, so they are not read back to be hashed again)."""
    spec = StageFile.read(stage_file)
    stage, resume = spec.stage, spec.resume
    stage_dir = StageDir(stage_file.parent)
    previous = StageDir(Path(spec.previous)) if spec.previous else None
    run = RunDir(Path(spec.run_dir))

    strategy = DeepSpeedStrategy(stage, json.loads(stage_dir.ds_config.read_text()))
    write_rank_file(stage_dir, strategy.rank)
    watch_end(stage_dir, strategy.rank)
    if strategy.is_rank0:
        print(stage_line(stage, resume), flush=True)
    else:
        _send_output_to(stage_dir.rank_log(strategy.rank))

    start = start_point(stage, spec.start, previous, verify_files=previous != previous_in_launch)
    tokenizer = build_tokenizer(stage.model, start.weights_dir)
    fast = FastPath(stage, strategy.is_rank0)

    def probe_model():  # micro_batch auto's throwaway engine: the stage's architecture, weights not read
        model = build_model(stage.model, tokenizer, stage.settings.seed, start.weights_dir, load_weights=False)
        prepare_for_data(model, tokenizer, stage)
        return model

    batch = batch_shape(stage, stage_dir, strategy, probe_model)
    record_memory(stage_dir, strategy.rank, "before_model", **strategy.device_memory())
    # A DeepSpeed checkpoint (full_state, a native or universal resume) overwrites the weights:
    # no need to read them. A consolidated resume builds the model from the tag's fp32 weights.
    if resume.mode == "consolidated":
        model = build_model(stage.model, tokenizer, stage.settings.seed, Path(resume.load_folder))
    else:
        from_checkpoint = start.checkpoint is not None or resume.mode != "fresh"
        model = build_model(stage.model, tokenizer, stage.settings.seed, start.weights_dir, load_weights=not from_checkpoint)
    prepare_for_data(model, tokenizer, stage)
    fast.prepare_model(model)
    record_memory(stage_dir, strategy.rank, "model_built", parameters=parameter_storage(model))
    sets = load_sets(stage, tokenizer)
    strategy.setup(model)
    fast.compile(strategy.engine)
    record_memory(stage_dir, strategy.rank, "initialized")
    checkpointer = Checkpointer(stage, stage_dir, strategy)
    progress = checkpointer.restore(start, resume)
    regularizer = make_regularizer(stage.settings.regularization, strategy)
    monitor = start_monitor(stage, run, stage_dir, model) if strategy.is_rank0 else NullMonitor()
    metrics = MetricsLog(stage_dir.metrics, progress.stage_step, monitor) if strategy.is_rank0 else NullMetrics()

    def evaluate() -> dict[str, float]:
        with fast.eager():
            return eval_metrics(strategy, sets, _primary(stage), tokenizer, stage.settings, batch.micro_batch)

    try:
        last_eval = train(stage, strategy, sets, progress, checkpointer, metrics, evaluate, stop, regularizer, batch, fast)
    except BaseException:
        metrics.close()
        raise
    if last_eval is None:
        metrics.close()
        return PREEMPTED
    if not last_eval:  # resumed at its last step (the handoff was lost): evaluate what is handed over
        last_eval = evaluate()
    extra = {"engine_optimizer": type(strategy.base_optimizer).__name__, "wandb_run_id": monitor.run_id, "regularization": regularizer.values(),
             "trainable": checkpointer.trainable_record(), "fast": fast.record(), "batch": batch}
    checkpointer.save_handoff(progress, last_eval, model, tokenizer, extra)
    record_memory(stage_dir, strategy.rank, "end", **strategy.device_memory())
    monitor.log_model(stage_dir.model)
    metrics.close()
    if strategy.is_rank0:
        print(f"[harness] stage {stage.index:02d} {stage.name} done: step {progress.global_step}; eval {eval_summary(last_eval)}", flush=True)
    strategy.close()
    return 0


def load_sets(stage: Stage, tokenizer) -> dict[str, TokenizedSet]:
    """The stage's data sets, from the token stores the launch side built."""
    s = stage.settings
    return {kind: open_set(request, s.seq_len, s.seed, tokenizer.pad_token_id) for kind, request in stage_stores(stage).items()}


def train(stage: Stage, strategy: DeepSpeedStrategy, sets: dict[str, TokenizedSet], progress: Progress, checkpointer: Checkpointer, metrics,
          evaluate: Callable[[], dict[str, float]], stop: StopRequest, regularizer: NoRegularizer, batch_shape: BatchRecord,
          fast: FastPath) -> dict[str, float] | None:
    """Train until the stage's last step; returns the final eval metrics, or None when stopped early."""
    s = stage.settings
    streams = {kind: SampleStream(data, s.seed) for kind, data in sets.items()}
    micro, grad_accum = batch_shape.micro_batch, batch_shape.grad_accum
    last_eval: dict[str, float] = {}
    bar = tqdm(total=stage.steps, initial=progress.stage_step, desc=f"[harness] {stage.name}", disable=not strategy.is_rank0,
               file=BarOutput(sys.stdout), dynamic_ncols=False, ncols=110, mininterval=1.0)
    if s.eval_on_start and progress.stage_step == 0:
        metrics.log({"stage": stage.name, "phase": stage.phase, "kind": stage.kind, "optimizer": stage.optimizer_type, "global_step": progress.global_step,
                     "stage_step": 0, **evaluate()})
    while progress.stage_step < stage.steps:
        step = progress.stage_step + 1
        source = stage.data.source_at(step)
        data = sets[source]
        started = time.perf_counter()
        first = progress.data_position.get(data.key, 0)
        loss_sum, tokens = 0.0, 0
        for accum_index in range(grad_accum):
            position = micro_batch_position(first, micro, accum_index, strategy.rank, strategy.world_size)
            batch = streams[source].batch(position, micro)
            loss_sum = loss_sum + strategy.train_micro_step(batch, regularizer.loss_term, fast.first_forward)
            tokens += token_count(batch)
        regularizer.apply_to_gradients()
        lr = strategy.current_lr()  # the rate this step used; the scheduler moves it in optimizer_step
        strategy.optimizer_step()
        loss_sum, tokens, stops = strategy.all_reduce_sum([loss_sum, tokens, float(stop.asked)])
        elapsed = time.perf_counter() - started

        progress.stage_step = step
        progress.samples_seen += stage.global_batch
        progress.tokens_seen += int(tokens)
        progress.data_position[data.key] = first + stage.global_batch
        fault_point(stage, strategy.rank, f"step{step}")
        row = {
            "stage": stage.name, "phase": stage.phase, "kind": stage.kind, "optimizer": stage.optimizer_type,
            "global_step": progress.global_step, "stage_step": step, "data": source,
            "train/loss": loss_sum / (grad_accum * strategy.world_size),
            "train/lr": lr,
            "train/grad_norm": strategy.grad_norm(),
            "train/tokens_per_s": tokens / elapsed,
            "train/samples_per_s": stage.global_batch / elapsed,
            **regularizer.last,
        }
        if step % s.eval_every == 0 or step == stage.steps:
            last_eval = evaluate()
            row.update(last_eval)
        if step % s.log_every == 0 or step == stage.steps or "eval/loss" in row:
            metrics.log(row)
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row['train/lr']:.2e}", tok_s=f"{row['train/tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if stops > 0:
            checkpointer.save(progress)
            bar.close()
            return None
        if step % s.checkpoint_every == 0 and step < stage.steps:
            checkpointer.save(progress)
            record_memory(checkpointer.dir, strategy.rank, f"checkpoint step{step}")
    bar.close()
    return last_eval


def _primary(stage: Stage) -> str:
    """The data set whose held-out rows the stage's eval metrics report."""
    return "finetune" if stage.data.source == "finetune" else "pretrain"


def _send_output_to(path: Path) -> None:
    """Ranks other than 0 write to their own log, so the console shows rank 0 only."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
