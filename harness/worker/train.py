"""The stages of one launch on one rank, one after the other: open the stage, train, hand off,
close. The loop reads top to bottom: step, log, eval, checkpoint, stop-if-asked.

SIGUSR1 (SLURM preemption or time limit) makes every rank finish the current
step, save a checkpoint and exit with PREEMPTED; a rerun resumes there.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

from harness.records import Progress, StageDir
from harness.records.console import duration
from harness.records.exit_codes import DISK_FULL, NONFINITE_LOSS, PREEMPTED
from harness.worker.data import SampleStream, micro_batch_position, token_count
from harness.worker.faults import fault_point
from harness.worker.memory import record_exit, record_memory, reset_peak
from harness.worker.objectives import RANK_OBJECTIVES
from harness.worker.pace import Pace
from harness.worker.stage_run import StageRun, StopRequest
from harness.worker.stops import DiskFull, LossWatch, NonFiniteLoss
from harness.worker.strategy import exit_launch, release_memory


class BarOutput:
    """tqdm writes each refresh as '\r' + bar; this writes bar + '\r' instead, so every refresh is a
    whole line to the launch side (harness/launch/processes.py shows "[harness] ..." lines on the
    console) and a warning printed next cannot end up inside it. The terminal shows the same."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text[1:] + "\r" if text.startswith("\r") else text)

    def flush(self) -> None:
        self.out.flush()


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
"""tqdm's own bar without its remaining time: the postfix has the stage's and the plan's ETA (harness/worker/pace.py)."""


def bar_postfix(row: dict) -> str:
    """'loss 2.345, lr 3.00e-03, 1520 tok/s, mfu 41.2%, eta 1m05s, plan 4m10s' of a step's row (tqdm puts ', ' before it)."""
    mfu = f", mfu {row['train/mfu']:.1%}" if "train/mfu" in row else ""
    return (f"loss {row['train/loss']:.3f}, lr {row['train/lr']:.2e}, {row['train/tokens_per_s']:.0f} tok/s{mfu}, "
            f"eta {duration(row['train/eta_stage_s'])}, plan {duration(row['train/eta_plan_s'])}")


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
    """Everything one rank does for one stage; returns 0, or PREEMPTED when stopped early."""
    run = StageRun.open(stage_file, stop, previous_in_launch)
    try:
        last_eval = train(run, run.progress)
        if last_eval is None:
            return PREEMPTED
        run.hand_off(last_eval or run.evaluate())  # {}: resumed at its last step (the handoff was lost)
    except NonFiniteLoss as stopped:
        stopped.report(run.dir, run.strategy.is_rank0)
        return NONFINITE_LOSS
    except DiskFull as full:
        full.report()
        return DISK_FULL
    finally:
        run.close()
    return 0


def train(run: StageRun, progress: Progress) -> dict[str, float] | None:
    """Train until the stage's last step; returns the final eval metrics, or None when stopped early."""
    stage, strategy, s = run.stage, run.strategy, run.stage.settings
    streams = {kind: SampleStream(data) for kind, data in run.sets.items()}
    micro, grad_accum = run.batch.micro_batch, run.batch.grad_accum
    micro_steps = grad_accum * strategy.world_size
    head = {"stage": stage.name, "phase": stage.phase, "kind": stage.kind, "optimizer": stage.optimizer_type}
    last_eval: dict[str, float] = {}
    pace, losses = Pace(stage, run.model, strategy.device), LossWatch(s.nonfinite_steps, stage.steps)
    bar = tqdm(total=stage.steps, initial=progress.stage_step, desc=f"[harness] {stage.name}", disable=not strategy.is_rank0,
               file=BarOutput(sys.stdout), dynamic_ncols=False, ncols=150, mininterval=1.0, bar_format=BAR_FORMAT)
    if s.eval_on_start and progress.stage_step == 0:
        run.metrics.log({**head, "global_step": progress.global_step, "stage_step": 0, **run.evaluate()})
    while progress.stage_step < stage.steps:
        step = progress.stage_step + 1
        source = stage.data.source_at(step)
        data, objective = run.sets[source], RANK_OBJECTIVES[source]
        pace.step_begins(step)
        first = progress.data_position.get(data.key, 0)
        ran_out = data.order.exhausted_by(first + stage.global_batch)
        if ran_out:  # a mixture with data.exhausted: stop
            if strategy.is_rank0:
                print(f"[harness] {stage.name}: {ran_out} has no unseen samples left for step {step} (data.exhausted: stop); the stage ends",
                      flush=True)
            bar.close()
            return {}
        loss_sum, tokens, metric_sums = 0.0, 0, {}
        for accum_index in range(grad_accum):
            position = micro_batch_position(first, micro, accum_index, strategy.rank, strategy.world_size)
            batch = streams[source].batch(position, micro)
            loss, metrics = strategy.train_micro_step(partial(objective.loss, settings=s), batch, run.regularizer.loss_term, run.fast.first_forward,
                                                      last_of_step=accum_index == grad_accum - 1)
            loss_sum = loss_sum + loss
            metric_sums = {key: metric_sums.get(key, 0.0) + value for key, value in metrics.items()}
            tokens += token_count(batch)
        run.regularizer.apply_to_gradients()
        lr = strategy.current_lr()  # the rate this step used; the scheduler moves it in optimizer_step
        strategy.optimizer_step()
        # One all-reduce per step: loss, tokens, stop requests, the objective's metrics, the penalties
        # and, from a mixture, the tokens each source gave.
        penalties, drawn = run.regularizer.partial_sums(), data.take_drawn()
        reduced = strategy.all_reduce_sum([loss_sum, tokens, float(run.stop.asked), *metric_sums.values(), *penalties, *drawn])
        loss_sum, tokens, stops = reduced[:3]
        metric_means = {key: value / micro_steps for key, value in zip(metric_sums, reduced[3:])}
        rest = reduced[3 + len(metric_sums):]
        penalty_sums, drawn = rest[:len(penalties)], rest[len(penalties):]

        progress.stage_step = step
        progress.samples_seen += stage.global_batch
        progress.tokens_seen += int(tokens)
        progress.data_position[data.key] = first + stage.global_batch
        fault_point(stage, strategy.rank, f"step{step}")
        row = {
            **head, "global_step": progress.global_step, "stage_step": step, "data": source,
            "train/loss": loss_sum / micro_steps,
            "train/lr": lr,
            "train/grad_norm": strategy.grad_norm(),
            **pace.step_ends(step, tokens),
            **metric_means,
            **run.regularizer.metrics(penalty_sums),
            **{f"data/{source}_source{k}_tokens": int(n) for k, n in enumerate(drawn)},
        }
        if step % s.eval_every == 0 or step == stage.steps:
            last_eval = run.evaluate()
            row.update(last_eval)
        if step % s.log_every == 0 or step == stage.steps or "eval/loss" in row:
            run.metrics.log(row)
        bar.set_postfix_str(bar_postfix(row), refresh=False)
        bar.update(1)
        losses.update(step, row["train/loss"])  # no checkpoint below of a state whose loss was not finite
        if stops > 0:
            if losses.finite:
                run.checkpointer.save(progress)
            bar.close()
            return None
        if step % s.checkpoint_every == 0 and step < stage.steps and losses.finite:
            run.checkpointer.save(progress)
            record_memory(run.dir, strategy.rank, f"checkpoint step{step}")
    bar.close()
    return last_eval
