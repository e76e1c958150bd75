"""The lines a user reads on the console, shared by the launch side and rank 0. No torch.

The console shows only lines that start with "[harness]" (processes._stream); DeepSpeed's own
output goes to the stage's launcher.log (and to the console with --verbose).
"""
from __future__ import annotations

from harness.records import ResumePoint
from harness.stages import Stage

# Eval metrics in the order the summary shows them, with their short names.
SUMMARY_METRICS = {"eval/loss": "loss", "eval/ppl": "ppl", "eval/lm_loss": "lm loss", "eval/sft_loss": "sft loss"}


def stage_line(stage: Stage, resume: ResumePoint) -> str:
    """The line that opens a stage; "[harness] stage NN " also tells the launch side that the
    launch's output from here on belongs to this stage's log."""
    line = (f"[harness] stage {stage.index:02d} {stage.name}: {stage.kind}, ZeRO-{stage.settings.zero_stage}, "
            f"{stage.world_size} rank(s), {stage.optimizer_type}, {stage.steps} steps")
    return line if resume.mode == "fresh" else f"{line}; resumes from {resume.tag} ({resume.mode})"


def launch_name(group: list[Stage]) -> str:
    """"stage 03 'sft'", or "stages 03-06 ('ms.c1.s1-sgd' .. 'ms.c1.s4-adamw') in one launch": what a launch runs."""
    first, last = group[0], group[-1]
    if first is last:
        return f"stage {first.index:02d} '{first.name}'"
    return f"stages {first.index:02d}-{last.index:02d} ('{first.name}' .. '{last.name}') in one launch"


def eval_summary(metrics: dict[str, float]) -> str:
    """'loss 2.673  ppl 14.49  sft loss 2.741  exact_match 0.250': the main figures first, then any
    other eval metric (task metrics), each with 3 or 4 significant decimals."""
    shown = {short: metrics[key] for key, short in SUMMARY_METRICS.items() if key in metrics}
    shown.update({key.removeprefix("eval/"): value for key, value in sorted(metrics.items())
                  if key not in SUMMARY_METRICS and key.startswith("eval/") and not key.endswith("_ppl")})
    return "  ".join(f"{name} {value:.2f}" if abs(value) >= 100 else f"{name} {value:.3f}" for name, value in shown.items())
