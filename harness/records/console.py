"""The lines a user reads on the console, shared by the launch side and rank 0. No torch.

The console shows only lines that start with "[harness]" (harness/launch/processes.py); DeepSpeed's
own output goes to the stage's launcher.log (and to the console with --verbose). A line that
starts with stage_prefix(N) opens stage N: the launcher's output from there on belongs to that
stage's log.
"""
from __future__ import annotations

import re

PREFIX = "[harness]"
STAGE_LINE = re.compile(rb"^\[harness\] stage (\d+) ")
"""Matches the line that opens a stage (as bytes, the way the launch side reads the launcher)."""
# Eval metrics in the order the summary shows them, with their short names.
SUMMARY_METRICS = {"eval/loss": "loss", "eval/ppl": "ppl", "eval/lm_loss": "lm loss", "eval/sft_loss": "sft loss"}


def stage_prefix(index: int) -> str:
    """'[harness] stage 03 ': how the line that opens stage 3 begins."""
    return f"{PREFIX} stage {index:02d} "


def eval_summary(metrics: dict[str, float]) -> str:
    """'loss 2.673  ppl 14.49  sft loss 2.741  exact_match 0.250': the main figures first, then any
    other eval metric (task metrics), each with 3 or 4 significant decimals."""
    shown = {short: metrics[key] for key, short in SUMMARY_METRICS.items() if key in metrics}
    shown.update({key.removeprefix("eval/"): value for key, value in sorted(metrics.items())
                  if key not in SUMMARY_METRICS and key.startswith("eval/") and not key.endswith("_ppl")})
    return "  ".join(f"{name} {value:.2f}" if abs(value) >= 100 else f"{name} {value:.3f}" for name, value in shown.items())


def duration(seconds: float) -> str:
    """'45s', '12m05s', '3h20m': short, for the progress bar and `harness status`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
