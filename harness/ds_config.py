"""Stage -> DeepSpeed config. `get_train_ds_config` is pure: typed stage in, plain dict out.

`check_ds_config` adds the checks DeepSpeed itself skips (the batch rule for the
target world size, unknown top-level keys, "auto" values); `validate_with_deepspeed`
then runs DeepSpeed's own config class in a child process, so the orchestrator
never imports torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from harness.plan import deep_merge
from harness.stages import ModelShape, Stage

# DeepSpeed's own optimizers; anything else is a torch.optim name, which under
# ZeRO needs "zero_allow_untested_optimizer" (DeepSpeed 0.19.8).
DEEPSPEED_OPTIMIZERS = {"Adam", "AdamW", "Adagrad", "Lamb", "Lion"}
# Never print DeepSpeed's per-step lines; the worker logs progress itself.
QUIET_STEPS = 1_000_000


def get_train_ds_config(stage: Stage) -> dict[str, Any]:
    """The DeepSpeed config of one stage, for its own world size. Nothing left as "auto"."""
    s = stage.settings
    config: dict[str, Any] = {
        "train_batch_size": stage.global_batch,
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        # Set explicitly: DeepSpeed 0.19.8 clips at 1.0 when the key is missing.
        "gradient_clipping": s.grad_clip,
        "steps_per_print": QUIET_STEPS,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_optimization": _zero_block(stage),
        "optimizer": _optimizer_block(stage),
    }
    if s.optimizer.type not in DEEPSPEED_OPTIMIZERS and s.zero_stage >= 1:
        config["zero_allow_untested_optimizer"] = True
    scheduler = _scheduler_block(stage)
    if scheduler is not None:
        config["scheduler"] = scheduler
    return deep_merge(config, s.deepspeed)


def _zero_block(stage: Stage) -> dict[str, Any]:
    s = stage.settings
    block: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload.optimizer:
        block["offload_optimizer"] = {"device": "cpu", "pin_memory": stage.accelerator == "cuda"}
    if s.offload.params:
        block["offload_param"] = {"device": "cpu", "pin_memory": stage.accelerator == "cuda"}
    if s.zero_stage == 3:
        # Gather 16-bit weights on save, so a plain state dict exists for the handoff.
        block["stage3_gather_16bit_weights_on_model_save"] = True
        if stage.model_shape is not None:
            block.update(zero3_buffers(stage.model_shape))
    return block


def zero3_buffers(shape: ModelShape) -> dict[str, int]:
    """ZeRO-3 buffer sizes from the model's shape instead of DeepSpeed's fixed defaults, which
    let a rank hold up to 1e9 gathered parameters and a 5e8-element gradient bucket and step
    the optimizer over one 1e9-element sub-group (0.19.8): at 309M parameters that is the whole
    model and more per rank (measured: 7.3 GB per rank at world size 2 against 3.7 GB of
    sharded state). Buckets as transformers' DeepSpeed integration sets them ("auto"); gathered
    parameters live for about two decoder layers (the one computing, the one prefetched) and
    the optimizer steps one layer's worth at a time. A phase's `deepspeed:` block overrides them."""
    h = shape.hidden_size
    return {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        "stage3_max_live_parameters": 2 * shape.layer_params,
        "stage3_max_reuse_distance": 2 * shape.layer_params,
        "sub_group_size": shape.layer_params,
    }


def _optimizer_block(stage: Stage) -> dict[str, Any]:
    s = stage.settings
    params = s.optimizer.params()
    if s.regularization.l2_mode == "weight_decay" and s.regularization.l2 > 0:
        params["weight_decay"] = s.regularization.l2
    if s.optimizer.type in ("Adam", "AdamW"):
        # DeepSpeed's Adam is AdamW unless told otherwise (adam_w_mode defaults to True).
        params["adam_w_mode"] = s.optimizer.type == "AdamW"
        if stage.accelerator == "cpu" and not s.offload.optimizer:
            # FusedAdam would JIT-build a CUDA-style op (~60 s on CPU); torch's Adam is exact.
            params["torch_adam"] = True
    if "betas" in params:
        params["betas"] = list(params["betas"])
    return {"type": s.optimizer.type, "params": params}


def _scheduler_block(stage: Stage) -> dict[str, Any] | None:
    """The stage's schedule; with span 'phase' one schedule runs across the phase's stages and
    each stage starts it at its offset (DeepSpeed schedulers take last_batch_iteration)."""
    spec = stage.settings.scheduler
    if spec.type == "none":
        return None
    lr = stage.settings.optimizer.lr
    length = stage.phase_steps if spec.span == "phase" else stage.steps
    warmup = round(spec.warmup_ratio * length)
    # No warmup is a warmup that starts at the peak: DeepSpeed needs at least one warmup step.
    start_ratio = 0.0 if warmup else 1.0
    warmup = max(1, warmup)
    if spec.type == "WarmupLR":
        params = {"warmup_min_lr": lr * start_ratio, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    elif spec.type == "WarmupDecayLR":
        params = {"warmup_min_lr": lr * start_ratio, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear", "total_num_steps": length}
    elif spec.type == "WarmupCosineLR":
        params = {"total_num_steps": length, "warmup_num_steps": warmup, "warmup_min_ratio": start_ratio, "cos_min_ratio": spec.min_lr_ratio, "warmup_type": "linear"}
    else:  # OneCycle: up for half the schedule, down for the other half.
        half = max(1, length // 2)
        params = {"cycle_min_lr": lr * spec.min_lr_ratio, "cycle_max_lr": lr, "cycle_first_step_size": half,
                  "cycle_second_step_size": max(1, length - half), "cycle_momentum": False, "decay_lr_rate": 0.0}
    if spec.span == "phase" and stage.phase_offset:
        params["last_batch_iteration"] = stage.phase_offset - 1
    return {"type": spec.type, "params": params}


def check_ds_config(config: dict[str, Any], world_size: int) -> list[str]:
    """Problems DeepSpeed would not catch: the batch rule for this world size and "auto" values."""
    problems = []
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    train = config.get("train_batch_size")
    if not all(isinstance(v, int) for v in (micro, accum, train)) or train != micro * accum * world_size:
        problems.append(
            f"train_batch_size ({train}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x world size ({world_size})"
        )
    problems += [f"{path} is 'auto'; every value must be explicit" for path in _auto_paths(config, "")]
    return problems


def _auto_paths(value: Any, path: str) -> list[str]:
    if value == "auto":
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _auto_paths(v, f"{path}.{k}" if path else k)]
    return []


def validate_with_deepspeed(configs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Run DeepSpeed's own config class on each config in a child process (it imports torch).
    Returns (index of the config, problem) pairs."""
    result = subprocess.run(
        [sys.executable, "-m", "harness.ds_check"],
        input=json.dumps(configs),
        capture_output=True,
        text=True,
        # Validation only: the CPU accelerator keeps CUDA from initialising in the child.
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"the DeepSpeed config check crashed:\n{result.stderr[-2000:]}")
    return [(index, problem) for index, problem in json.loads(result.stdout.strip().splitlines()[-1])]
