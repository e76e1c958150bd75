"""How much memory one rank of a stage needs, estimated before anything runs: what `harness plan`
shows per stage, what the `auto` settings choose by (harness/stages/fit.py), and what every rank's
memory record carries next to the peak it measured (bench/estimate.py compares the two). Pure, no
torch: every figure comes from the Stage (its model shape, batch, precision, trainable set,
checkpointing) and its DeepSpeed config (ZeRO stage, offload, bucket sizes).

One rank's peak is modelled as three parts (records.MemoryEstimate):
    held      through the whole step: the runtime, the weights, ZeRO-3's gathered parameters, the
              fp32 master copy, the optimizer states, the gradient partitions;
    forward   added at the end of the forward: the activations saved for the backward, the logits;
    backward  added at the end of the backward: gradients not yet reduced and the buffers that
              reduce them. The backward frees the activations as it makes the gradients, so the
              peak is held + the larger of the two.
Each term below names where its rule comes from: DeepSpeed 0.19.8's ZeRO optimizers (stage_1_and_2.py,
stage3.py, engine.py), transformers 5.23's Llama layers, torch's optimizers. The constants measured
(RUNTIME_BYTES, the activation and logit counts) were fitted on CPU with bench/estimate.py: every
case of tiny, small, 61M and 309M Llama shapes at ZeRO 0-3, world size 1/2/4, with and without
offload and checkpointing lands within 20% (bench/RESULTS.md). The CUDA figures follow the same
rules but were not measured on a GPU.

Adapters: the resolved trainable set counts the base with the adapter applied (total_params) and
trains only the adapter's matrices (trainable_params), so they alone get gradients, a master copy
and optimizer state; the frozen base counts as weights.
"""
from __future__ import annotations

import math
from typing import Any

from harness.objectives import OBJECTIVES
from harness.records.memory import MemoryEstimate
from harness.stages.stage import ModelShape, Stage

RUNTIME_BYTES = {"cpu": 450_000_000, "cuda": 1_000_000_000}
"""A rank before it holds any model state. cpu: the RSS of a rank of the tiny model after
deepspeed.initialize at ZeRO-0 (Python, torch, DeepSpeed with its shm op, transformers, the gloo
process group, the data): 0.39 GB before the model is built, 0.45 GB after (bench/estimate.py).
cuda: the CUDA context, cuBLAS workspaces and NCCL's buffers, outside torch's allocator (about
0.5-1 GB on an H100, nvidia-smi against torch.cuda.max_memory_allocated; not measured here)."""
ZERO_RUNTIME_BYTES = 50_000_000
"""What DeepSpeed's ZeRO optimizers (stages 1-3) add to a rank whatever the model: measured 0.50 GB
against ZeRO-0's 0.45 GB after initialize, for the tiny and the small model alike (bench/estimate.py)."""
HOST_RUNTIME_BYTES = 3_000_000_000
"""Host memory of a cuda rank (the CUDA libraries mapped in); counted against host memory with offload."""
DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed 0.19.8's default reduce_bucket_size and ZeRO-0's all-reduce buffer (engine.py
MEMORY_OPT_ALLREDUCE_SIZE), in elements, where the config sets none."""
OPTIMIZER_STATE_BYTES = {"Adam": 8, "AdamW": 8, "Lamb": 8, "Lion": 4, "Adagrad": 4, "SGD": 0, "RMSprop": 4}
"""fp32 state per trained parameter: Adam's two moments (exp_avg, exp_avg_sq); Lamb the same; Lion and
SGD with momentum one momentum buffer; Adagrad its sum of squares; RMSprop its square average (plus a
momentum buffer with momentum)."""
ACTIVATIONS_PER_TOKEN = (11, 4, 4)
"""Elements a Llama decoder layer saves per token for its backward, as (x hidden, x intermediate,
x key width), counted from transformers 5.23's LlamaDecoderLayer with SDPA: each RMSNorm keeps its
input and normalized value (2 h, twice) and its output for the next projection (h, twice); RoPE keeps
q and rotate_half(q) (2 h) and the same of k (2 kv); SDPA keeps q, k, v and its output (h + 2 kv + h);
o_proj its input (h); the MLP gate, up, SiLU(gate) and their product (4 i). SDPA's flash kernel (CPU
and CUDA) keeps no attention scores; eager attention does (SCORE_COPIES)."""
SCORE_COPIES = 2
"""Eager attention: the scores and the softmax probabilities, heads x seq_len^2 each per row."""
LOGIT_COPIES = 3
"""The logits at the end of the forward (vocab per token, fp32): lm_head's output, cross-entropy's
log-softmax (transformers' ForCausalLMLoss upcasts to fp32) and, in the backward, the logits' gradient."""


def trained_params(stage: Stage) -> tuple[int, int]:
    """(every parameter, trained parameters): the resolved trainable set's counts (an adapter's
    included), else the shape's (every parameter trains)."""
    if stage.trainable is not None:
        return stage.trainable.total_params, stage.trainable.trainable_params
    return stage.model_shape.params, stage.model_shape.params


def estimate(stage: Stage, config: dict[str, Any]) -> MemoryEstimate:
    """The peak of one rank of `stage` run with DeepSpeed config `config` (ZeRO stage, offload,
    precision, micro batch and buckets are read from it: a phase's deepspeed block counts)."""
    shape = stage.model_shape
    zero = config.get("zero_optimization", {})
    z = int(zero.get("stage", 0))
    world = stage.world_size
    total, trained = trained_params(stage)
    half = config.get("bf16", {}).get("enabled") or config.get("fp16", {}).get("enabled")
    width = 2 if half else 4
    offload_states = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme") and z >= 1
    offload_params = zero.get("offload_param", {}).get("device") in ("cpu", "nvme") and z == 3
    cuda = stage.accelerator == "cuda"

    runtime = RUNTIME_BYTES[stage.accelerator] + (ZERO_RUNTIME_BYTES if z >= 1 else 0)
    held = {"runtime": runtime, "weights": weight_bytes(shape, total, z, world, width),
            "gathered": gathered_bytes(zero, total, z, width)}
    states = {"master weights": master_bytes(trained, z, world, half), "optimizer": optimizer_bytes(stage, trained, z, world),
              "gradients": gradient_partition_bytes(trained, z, world) + (offload_gradient_bytes(shape, trained, z, world) if offload_states else 0)}
    host: dict[str, int] = {}
    if offload_states and cuda:  # on cpu offloaded states are in host memory either way
        host, states = {"runtime": HOST_RUNTIME_BYTES, **states}, {}
    if offload_params and cuda:
        host["weights"] = held.pop("weights")
    held.update(states)
    # Rows through one forward: a preference pair is two.
    micro = int(config.get("train_micro_batch_size_per_gpu", stage.micro_batch)) * max(OBJECTIVES[kind].rows_per_sample for kind in stage.data.sets)
    forward = {"activations": activation_bytes(stage, micro, width), "logits": logit_bytes(shape, micro * stage.settings.seq_len)}
    backward = {"gradients": unreduced_gradient_bytes(trained, z, width), "buffers": buffer_bytes(zero, trained, z, width)}
    return MemoryEstimate(device="gpu" if cuda else "host", held=held, forward=forward, backward=backward, host=host)


def weight_bytes(shape: ModelShape, total: int, zero_stage: int, world: int, width: int) -> int:
    """The module's weights in the training dtype (DeepSpeed casts the module to bf16/fp16 when enabled):
    every rank holds them whole at ZeRO 0-2 (ZeRO-1/2 flatten them into one buffer per group,
    stage_1_and_2.py bit16_groups_flat); ZeRO-3 holds its 1/world partition of each (stage3.py ds_tensor)."""
    if zero_stage < 3:
        return total * width
    return math.ceil(total / world) * width


def gathered_bytes(zero: dict[str, Any], total: int, zero_stage: int, width: int) -> int:
    """ZeRO-3: parameters gathered whole for the layer that computes and those prefetched: at most
    stage3_max_live_parameters + stage3_prefetch_bucket_size elements (partitioned_param_coordinator.py;
    this harness sets them to two decoder layers, harness/stages/ds_config.py zero3_buffers)."""
    if zero_stage < 3:
        return 0
    live = int(zero.get("stage3_max_live_parameters", 1e9)) + int(zero.get("stage3_prefetch_bucket_size", 5e7))
    return min(total, live) * width


def master_bytes(trained: int, zero_stage: int, world: int, half: bool) -> int:
    """The fp32 copy the optimizer updates: ZeRO 1-3 keep one for their partition even for an fp32
    model (stage_1_and_2.py single_partition_of_fp32_groups, stage3.py fp32_partitioned_groups_flat:
    clones); ZeRO-0 updates fp32 weights in place, and keeps a whole fp32 copy of bf16 ones (bf16_optimizer.py)."""
    if zero_stage == 0:
        return 4 * trained if half else 0
    return 4 * math.ceil(trained / world)


def optimizer_bytes(stage: Stage, trained: int, zero_stage: int, world: int) -> int:
    """The optimizer's fp32 state per trained parameter (OPTIMIZER_STATE_BYTES), partitioned over the
    ranks from ZeRO-1 on. Created at the first step; it stays."""
    spec = stage.settings.optimizer
    per = OPTIMIZER_STATE_BYTES[spec.type] + (4 if spec.type in ("SGD", "RMSprop") and spec.momentum else 0)
    return per * (trained if zero_stage == 0 else math.ceil(trained / world))


def gradient_partition_bytes(trained: int, zero_stage: int, world: int) -> int:
    """Gradients kept through the step: ZeRO-3 reduces each gradient into the rank's fp32 partition as
    the backward makes it (stage3.py grad_partitions_flat_buffer, allocated at initialize). ZeRO-1/2
    make their fp32 partition (stage_1_and_2.py single_grad_partition) only at the step, once the
    activations and the bucket are freed: it never adds to the peak (measured: ZeRO-2 peaks as ZeRO-1)."""
    return 4 * math.ceil(trained / world) if zero_stage == 3 else 0


def offload_gradient_bytes(shape: ModelShape, trained: int, zero_stage: int, world: int) -> int:
    """What optimizer offload adds: a second fp32 gradient partition, the one the offloaded optimizer
    steps from (stage_1_and_2.py single_grad_partition on the offload device, stage3.py the host
    gradient partitions), and at ZeRO-1/2 a staging buffer of the largest parameter
    (temp_grad_buffer_for_cpu_offload). Measured at ZeRO-2 (61M) and ZeRO-3 (309M) on CPU."""
    largest = max(shape.vocab_size * shape.hidden_size, shape.hidden_size * shape.intermediate_size)
    return 4 * math.ceil(trained / world) + (4 * largest if zero_stage < 3 else 0)


def unreduced_gradient_bytes(trained: int, zero_stage: int, width: int) -> int:
    """Whole gradients at the end of the backward: ZeRO-0 keeps every parameter's .grad until the
    accumulation boundary all-reduces them (engine.py allreduce_gradients); ZeRO-1/2 copy them into
    their reduce bucket (stage_1_and_2.py ipg buffer, reduce_bucket_size elements: DeepSpeed's default
    5e8 holds a model up to 500M parameters whole) and reduce it when full or at the boundary.
    ZeRO-3 reduces them into its partition bucket by bucket (reduce_bucket_size: h^2 here)."""
    return trained * width if zero_stage <= 2 else 0


def buffer_bytes(zero: dict[str, Any], trained: int, zero_stage: int, width: int) -> int:
    """The reduction's copy of the gradients: ZeRO-0 flattens them into all-reduce buffers of up to
    DEEPSPEED_BUCKET elements (engine.py allreduce_bucket); ZeRO-1/2 reduce a flattened copy of the
    bucket (stage_1_and_2.py), ZeRO-3 a bucket of reduce_bucket_size (stage3.py). Pages cost memory
    once written, so a bucket larger than the gradients costs the gradients."""
    bucket = DEEPSPEED_BUCKET if zero_stage == 0 else int(zero.get("reduce_bucket_size", DEEPSPEED_BUCKET))
    return min(trained, bucket) * width


def activation_bytes(stage: Stage, micro: int, width: int) -> int:
    """What the forward saves for the backward, per rank: ACTIVATIONS_PER_TOKEN for every decoder layer
    that is not checkpointed; a checkpointed one keeps only its input (hidden per token: transformers'
    GradientCheckpointingLayer under torch.utils.checkpoint, non-reentrant) and, while the backward
    recomputes it, one layer's worth (torch.utils.checkpoint frees it before the next layer's
    recompute); eager attention adds its scores."""
    shape, seq = stage.model_shape, stage.settings.seq_len
    tokens = micro * seq
    h_count, i_count, kv_count = ACTIVATIONS_PER_TOKEN
    layer = tokens * (h_count * shape.hidden_size + i_count * shape.intermediate_size + kv_count * shape.kv_width)
    if stage.fast.attention == "eager":
        layer += SCORE_COPIES * micro * shape.num_heads * seq * seq
    every = stage.recompute_every
    checkpointed = 0 if every == 0 else math.ceil(shape.num_layers / every)
    kept = shape.num_layers - checkpointed
    # The backward runs from the top: a layer it recomputes stands where the kept layers above it
    # were already freed, so the peak is the kept layers, or one recomputed layer when none is kept.
    elements = max(kept, 1 if checkpointed else 0) * layer + checkpointed * tokens * shape.hidden_size
    return elements * width


def logit_bytes(shape: ModelShape, tokens: int) -> int:
    """The logits and the loss over them (LOGIT_COPIES fp32 copies of vocab per token)."""
    return LOGIT_COPIES * tokens * shape.vocab_size * 4
