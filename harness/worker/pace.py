"""How fast a stage trains and when it ends, for its metric rows (metrics.jsonl, W&B) and its
progress bar: tokens/s, MFU where the device's peak is known, and the ETA of the stage and of the
whole plan. Each step is also what this rank's heartbeat says it does (harness/worker/heartbeat.py).

- ETA: the wall time per step measured since the end of this run's first step (evals and
  checkpoints included, the first step's compiling not) times the steps left: the stage's, and
  with the plan's later stages' (stage.steps_after).
- MFU: model FLOPs per token, 6 x the parameters the matrix multiplies use (all but the input
  embeddings) plus 12 x layers x hidden size x seq_len for attention (PaLM, appendix B), times the
  tokens per second, over the peak of every rank's device (PEAK_FLOPS, dense bf16/fp16). None on
  CPU, in fp32 and on devices the table lacks: no number rather than a wrong one.
"""
from __future__ import annotations

import time

import torch

from harness.stages import Stage
from harness.worker import heartbeat

# Dense bf16/fp16 tensor-core peak per GPU by a part of its device name, the first that matches.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class Pace:
    def __init__(self, stage: Stage, model: torch.nn.Module, device: torch.device):
        self.stage = stage
        self.flops_per_token = model_flops_per_token(model, stage.settings.seq_len)
        self.peak = peak_flops(device, stage.precision)
        self._started = self._first_end = 0.0
        self._first_step = 0

    def step_begins(self, step: int) -> None:
        heartbeat.doing("step", step)
        self._started = time.perf_counter()

    def step_ends(self, step: int, tokens: float) -> dict[str, float]:
        """The step's train/ figures: tokens_per_s, samples_per_s, eta_stage_s, eta_plan_s, and mfu where known."""
        now = time.perf_counter()
        elapsed = now - self._started
        heartbeat.step_took(elapsed)
        if not self._first_end:
            self._first_end, self._first_step = now, step
            per_step = elapsed
        else:
            per_step = (now - self._first_end) / (step - self._first_step)
        left = self.stage.steps - step
        row = {"train/tokens_per_s": tokens / elapsed, "train/samples_per_s": self.stage.global_batch / elapsed,
               "train/eta_stage_s": per_step * left, "train/eta_plan_s": per_step * (left + self.stage.steps_after)}
        if self.peak:
            row["train/mfu"] = self.flops_per_token * row["train/tokens_per_s"] / (self.peak * self.stage.world_size)
        return row


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward and backward FLOPs per token (see the module docstring)."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: ds_numel is the full size
    embedding = model.get_input_embeddings().weight
    params -= getattr(embedding, "ds_numel", embedding.numel())
    return 6 * params + 12 * model.config.num_hidden_layers * model.config.hidden_size * seq_len


def peak_flops(device: torch.device, precision: str) -> float | None:
    """One device's dense bf16/fp16 peak, when known (CUDA devices in PEAK_FLOPS, not fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_FLOPS.items() if part in name), None)

