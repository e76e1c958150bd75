"""Stage -> DeepSpeed config. `get_train_ds_config` is pure: typed stage in, plain dict out.

A phase's `deepspeed:` block (or a pasted DeepSpeed JSON file, "auto" values and all) is merged
over the generated config by `merge_deepspeed_block`; `deepspeed_block_problems` names each key
of it that cannot work. `check_ds_config` adds the checks DeepSpeed itself skips (the batch rule
for the target world size); the launch side then runs DeepSpeed's own config class in a child
process (harness/jobs/ds_check.py, which also reports unknown top-level keys), so it never
imports torch.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

from harness.plan import deep_merge
from harness.stages.stage import ModelShape, Stage

# DeepSpeed's own optimizers; anything else is a torch.optim name, which under
# ZeRO needs "zero_allow_untested_optimizer" (DeepSpeed 0.19.8).
DEEPSPEED_OPTIMIZERS = {"Adam", "AdamW", "Adagrad", "Lamb", "Lion"}
# Never print DeepSpeed's per-step lines; the worker logs progress itself.
QUIET_STEPS = 1_000_000
# Keys the harness decides from the plan and relies on (it batches the data, hands off and logs by
# them): a deepspeed block may leave them "auto" or repeat the plan's value, not change them.
# Each names the plan field to set instead.
PLAN_DECIDES = {
    ("train_batch_size",): "global_batch",
    ("train_micro_batch_size_per_gpu",): "micro_batch",
    ("gradient_accumulation_steps",): "global_batch",
    ("bf16", "enabled"): "precision",
    ("fp16", "enabled"): "precision",
    ("zero_optimization", "stage"): "zero_stage",
    ("optimizer", "type"): "optimizer",
    ("scheduler", "type"): "scheduler",
}
MISSING = object()  # a key the config does not have


def get_train_ds_config(stage: Stage) -> dict[str, Any]:
    """The DeepSpeed config of one stage, for its own world size: the generated config with the
    stage's deepspeed block merged over it."""
    return merge_deepspeed_block(_generated_config(stage), stage.settings.deepspeed, stage.model_shape)


def _generated_config(stage: Stage) -> dict[str, Any]:
    """The config the plan alone gives the stage. Nothing "auto"."""
    s = stage.settings
    config: dict[str, Any] = {
        "train_batch_size": stage.global_batch,
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        # Set explicitly: DeepSpeed 0.19.8 clips at 1.0 when the key is missing.
        "gradient_clipping": s.grad_clip,
        "steps_per_print": QUIET_STEPS,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_optimization": _zero_block(stage),
        "optimizer": _optimizer_block(stage),
    }
    if s.optimizer.type not in DEEPSPEED_OPTIMIZERS and stage.zero_stage >= 1:
        config["zero_allow_untested_optimizer"] = True
    if stage.fast.compile == "deepcompile":
        config["compile"] = {"deepcompile": True}  # engine.compile() (harness/worker/fast.py) then uses it
    scheduler = _scheduler_block(stage)
    if scheduler is not None:
        config["scheduler"] = scheduler
    return config


def merge_deepspeed_block(generated: dict[str, Any], block: dict[str, Any], shape: ModelShape | None) -> dict[str, Any]:
    """block over generated, key by key. "auto" takes the value generated at the same key, the way
    transformers' DeepSpeed integration fills "auto" from its training arguments: batch sizes,
    clipping, precision, optimizer and scheduler params; ZeRO's reduce_bucket_size,
    stage3_prefetch_bucket_size and stage3_param_persistence_threshold from the model's hidden
    size at any stage. An "auto" with nothing to take stays (deepspeed_block_problems reports it);
    keys the plan decides (PLAN_DECIDES) keep the generated value."""
    merged = copy.deepcopy(generated)
    sources = _auto_sources(generated, shape)
    for path, value in _leaves(block):
        if path not in PLAN_DECIDES:
            _put(merged, path, _lookup(sources, path, "auto") if value == "auto" else copy.deepcopy(value))
    return merged


def deepspeed_block_problems(stage: Stage) -> list[tuple[str, Any, str]]:
    """(key path, value, what is allowed) for each key of the stage's deepspeed block that cannot
    work: an "auto" the plan gives no value for, a value the plan decides otherwise, a value of
    another type than the one generated at that key."""
    generated = _generated_config(stage)
    sources = _auto_sources(generated, stage.model_shape)
    problems = []
    for path, value in _leaves(stage.settings.deepspeed):
        key, planned = ".".join(map(str, path)), _lookup(generated, path, MISSING)
        if value == "auto":
            if _lookup(sources, path, MISSING) is MISSING:
                problems.append((key, value, 'a value: "auto" takes what the plan generates at this key, and it generates nothing there'))
        elif path in PLAN_DECIDES and not _same(value, planned):
            plan_value = "none" if planned is MISSING else repr(planned)
            problems.append((key, value, f'"auto" or the plan\'s value ({plan_value}): set {PLAN_DECIDES[path]} in the plan instead '
                                         "(the harness batches the data, hands off and logs by the plan)"))
        elif planned is not MISSING and _json_type(value) != _json_type(planned):
            problems.append((key, value, f"a {_json_type(planned)}, like the generated {planned!r}"))
    return problems


def _auto_sources(generated: dict[str, Any], shape: ModelShape | None) -> dict[str, Any]:
    """What "auto" takes: the generated config, and the model-sized ZeRO buckets at any stage."""
    return deep_merge({"zero_optimization": auto_buckets(shape)}, generated) if shape is not None else generated


def _leaves(block: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every value in a nested mapping that is not itself a non-empty mapping."""
    for key, value in block.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def _lookup(config: Any, path: tuple[str, ...], default: Any) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return default
        config = config[key]
    return config


def _put(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(config.get(key), dict):
            config[key] = {}
        config = config[key]
    config[path[-1]] = value


def _same(value: Any, planned: Any) -> bool:
    if isinstance(value, str) and isinstance(planned, str):
        return value.lower() == planned.lower()  # DeepSpeed reads its optimizer names in any case
    return value == planned


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _zero_block(stage: Stage) -> dict[str, Any]:
    block: dict[str, Any] = {"stage": stage.zero_stage}
    if stage.offload.optimizer:
        block["offload_optimizer"] = {"device": "cpu", "pin_memory": stage.accelerator == "cuda"}
    if stage.offload.params:
        block["offload_param"] = {"device": "cpu", "pin_memory": stage.accelerator == "cuda"}
    if stage.zero_stage == 3:
        # Gather 16-bit weights on save, so a plain state dict exists for the handoff.
        block["stage3_gather_16bit_weights_on_model_save"] = True
        if stage.model_shape is not None:
            block.update(zero3_buffers(stage.model_shape))
    return block


def auto_buckets(shape: ModelShape) -> dict[str, int]:
    """ZeRO buckets sized from the model's hidden size, as transformers' DeepSpeed integration sets
    them when they are "auto"."""
    h = shape.hidden_size
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h}


def zero3_buffers(shape: ModelShape) -> dict[str, int]:
    """ZeRO-3 buffer sizes from the model's shape instead of DeepSpeed's fixed defaults, which
    let a rank hold up to 1e9 gathered parameters and a 5e8-element gradient bucket and step
    the optimizer over one 1e9-element sub-group (0.19.8): at 309M parameters that is the whole
    model and more per rank (measured: 7.3 GB per rank at world size 2 against 3.7 GB of
    sharded state). Buckets as transformers' DeepSpeed integration sets them ("auto"); gathered
    parameters live for about two decoder layers (the one computing, the one prefetched) and
    the optimizer steps one layer's worth at a time. A phase's `deepspeed:` block overrides them."""
    return {
        **auto_buckets(shape),
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
        if stage.accelerator == "cpu" and not stage.offload.optimizer:
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
    """Problems DeepSpeed would not catch: the batch rule for this world size (DeepSpeed checks it
    for world size 1 outside a distributed run)."""
    problems = []
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    train = config.get("train_batch_size")
    if not all(isinstance(v, int) for v in (micro, accum, train)) or train != micro * accum * world_size:
        problems.append(
            f"train_batch_size ({train}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x world size ({world_size})"
        )
    return problems
