"""DeepSpeedStrategy: the one object that owns the DeepSpeed engine on a rank.

Distributed init, deepspeed.initialize, forward/backward/step, checkpoint save
and load, gathering full weights and optimizer state, small collectives and
the exit. The training loop never calls DeepSpeed directly.
"""
from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
import xxhash
from deepspeed.utils import safe_get_full_fp32_param
from transformers.integrations import HfDeepSpeedConfig

from harness.stages import Stage
from harness.worker.adapter import merged_shapes, merged_weights

LossOf = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(engine, batch) -> (loss, step metrics): an objective's loss at the stage's settings (harness/worker/objectives)."""


class DeepSpeedStrategy:
    def __init__(self, stage: Stage, ds_config: dict[str, Any]):
        self.stage = stage
        self.ds_config = ds_config
        deepspeed.init_distributed(dist_backend="gloo" if stage.accelerator == "cpu" else "nccl")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != stage.world_size:
            raise RuntimeError(f"stage {stage.name} expects {stage.world_size} ranks, the launcher started {self.world_size}")
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.engine: Any = None
        self.frozen_names: list[str] = []
        """Parameters this stage does not train (set by setup)."""
        self.adapter = stage.trainable.adapter if stage.trainable else None
        """The adapter the engine trains (harness/worker/adapter.py): its weights are handed over merged."""
        # While this object lives, transformers builds and loads models under deepspeed.zero.Init for
        # a ZeRO-3 config: partitioned as created, a checkpoint loaded parameter by parameter, so no
        # rank holds the whole model. transformers keeps only a weak reference: hold it for the stage.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    # ---- engine lifecycle -------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        """deepspeed.initialize with the stage's parameter groups (stage.trainable): every other
        parameter is frozen (requires_grad False), so no ZeRO stage gives it gradients, optimizer
        state or a master copy. Each group trains at the scheduled lr x its lr_scale."""
        groups = self._param_groups(model)
        self.engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        # Training mode: from_pretrained returns the model in eval mode (transformers 5.23), where
        # dropout is off and checkpointed layers keep their activations instead of recomputing them.
        self.engine.train()
        if scheduler is None:
            _scale_lrs(optimizer.param_groups)
            return
        # Every group starts at the config's lr, so DeepSpeed's schedulers (0.19.8) write the same
        # scheduled lr into each (WarmupLR, OneCycle: from their own min/max; WarmupCosineLR: from
        # each group's lr at construction); each group's multiplier is applied after every step.
        step = scheduler.step

        def step_then_scale(*args, **kwargs):
            step(*args, **kwargs)
            _scale_lrs(scheduler.optimizer.param_groups)

        scheduler.step = step_then_scale
        # DeepSpeed 0.19.8 schedulers built at iteration -1 set lr 0 ("before it has started"),
        # so the first step would be wasted; one built at an offset sets no lr at all. Apply
        # the lr of the first position now: step k of a stage uses the schedule at k-1.
        scheduler.step(scheduler.last_batch_iteration + 1)

    def _param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups by name, as the launch side resolved them; freezes the rest."""
        chosen = self.stage.trainable
        params = dict(model.named_parameters())
        if chosen is None:
            return [{"params": list(params.values()), "lr_scale": 1.0}]
        listed = {name for group in chosen.groups for name in group.names} | set(chosen.frozen)
        if listed != set(params):
            raise RuntimeError(f"stage {self.stage.name}: the model's parameters differ from those the plan resolved: "
                               f"not in the model {sorted(listed - set(params))[:5]}, not in the plan {sorted(set(params) - listed)[:5]}")
        for name in chosen.frozen:
            params[name].requires_grad_(False)
        self.frozen_names = list(chosen.frozen)
        no_decay = {"weight_decay": 0.0}
        return [{"params": [params[name] for name in group.names], "lr_scale": group.lr_scale, **({} if group.decay else no_decay)}
                for group in chosen.groups]

    def advance_schedule(self, steps: int) -> None:
        """Move the lr schedule on by `steps` optimizer steps (a resume with a fresh optimizer)."""
        scheduler = self.engine.lr_scheduler
        if scheduler is not None:
            scheduler.step(scheduler.last_batch_iteration + steps)
        self.engine.global_steps += steps

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def set_batch(self, micro_batch: int, grad_accum: int) -> None:
        """The micro batch and accumulation steps of the next engine (micro_batch auto's probe and
        its choice); transformers' ZeRO-3 switch is made again from the new config."""
        self.ds_config = {**self.ds_config, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
                          "train_batch_size": micro_batch * grad_accum * self.world_size}
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def train_micro_step(self, loss_of: LossOf, batch: dict[str, torch.Tensor], extra_loss=None, forward_guard=None,
                         last_of_step: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro batch: loss_of(engine, batch) is the objective's loss and
        step metrics (harness/worker/objectives); extra_loss() a penalty added before backward.
        Returns the objective's loss (without penalties) and metrics, detached. forward_guard(forward)
        runs the forward (FastPath.first_forward: the first compiled one). last_of_step: the step's
        last micro batch, after which optimizer_step runs."""
        # optimizer_step calls engine.step() once per step, not once per micro batch: the engine is
        # told where the boundary is, or it would count steps as micro batches and update every
        # grad_accum-th step with grad_accum steps' gradients.
        self.engine.set_gradient_accumulation_boundary(last_of_step)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        forward = lambda: loss_of(self.engine, batch)  # noqa: E731
        loss, metrics = forward() if forward_guard is None else forward_guard(forward)
        extra = extra_loss() if extra_loss is not None else None
        self.engine.backward(loss if extra is None else loss + extra)
        return loss.detach(), {key: value.detach() for key, value in metrics.items()}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Forward without gradients (evaluation, generation); collective under ZeRO-3."""
        inputs = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(self.device)
        return self.engine(**inputs).logits

    @contextmanager
    def generation_module(self, gather: bool) -> Iterator[torch.nn.Module]:
        """The module to generate with, in eval mode. Under ZeRO-3 with gather, every parameter is
        gathered once for the whole block and ZeRO-3's per-module hooks are taken off meanwhile:
        they would release each layer after its forward and gather it again at the next one
        (trl PR #1483, about 10x slower). Without gather, or below ZeRO-3, forwards run as in
        training. Collective under ZeRO-3: every rank enters and leaves together."""
        module = self.module
        module.eval()
        try:
            if not (gather and self.engine.zero_optimization_partition_weights()):
                yield module
                return
            offload = self.engine.optimizer.parameter_offload
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                # As trl's remove_hooks/add_hooks (DeepSpeed >= 0.16.4): the start-of-forward hook
                # stays; re-registering the module hooks invalidates ZeRO-3's recorded fetch trace.
                for param in module.parameters():
                    param.ds_active_sub_modules.clear()
                for hook in offload.forward_hooks + offload.backward_hooks:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
                try:
                    yield module
                finally:
                    # The ids the modules had: DeepSpeed numbers them from a counter that lives on
                    # across the engines of one process (a mutable default argument, 0.19.8).
                    offload._register_deepspeed_module(offload.module, count=[offload.module.ds_id])
        finally:
            module.train()

    def optimizer_step(self) -> None:
        self.engine.step()

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer doing the update (ZeRO and bf16 wrap it in `.optimizer`)."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def current_lr(self) -> float:
        """The scheduled lr (a group's is this x its lr_scale)."""
        group = self.engine.optimizer.param_groups[0]
        return group["lr"] / group["lr_scale"]

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ---- checkpoints -------------------------------------------------------
    def save_checkpoint(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)

    def load_checkpoint(self, folder: Path, tag: str, with_scheduler: bool) -> dict[str, Any]:
        """Load module and optimizer state (never module-only: under ZeRO-3 that silently
        loads nothing, DeepSpeed 0.19.8). Returns the checkpoint's client state."""
        hyperparams = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        path, client_state = self.engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=with_scheduler, load_module_strict=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{tag}' in {folder}")
        # ZeRO-3's universal load (DeepSpeed 0.19.8) puts one `step` tensor into every sub-group's
        # state, which Adam then advances once per sub-group and step (a wrong bias correction),
        # and writes group 0's hyperparameters into every group.
        for state in self.base_optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        if self.ds_config.get("checkpoint", {}).get("load_universal"):
            scheduled = self.current_lr()
            for group, own in zip(self.engine.optimizer.param_groups, hyperparams):
                group.update({**own, "lr": scheduled * own["lr_scale"]})
        if not with_scheduler:
            # Moments come from the checkpoint; lr, betas, momentum, decay from this stage's config.
            for group, fresh in zip(self.engine.optimizer.param_groups, hyperparams):
                group.update(fresh)
            self.engine.global_steps = 0
            self.engine.global_samples = 0
        return client_state or {}

    # ---- full views of sharded state (collective: every rank calls) --------
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> full shape of every parameter of the model the handoff holds (ZeRO-3 parameters
        are empty outside forward; with an adapter, the merged model's)."""
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.module.named_parameters()}
        return shapes if self.adapter is None else merged_shapes(shapes, self.adapter)

    def model_weights(self, adapter_tensors: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 weight) of the model the handoff holds, in name order: the engine's
        parameters, or with an adapter the base merged with it one layer at a time (adapter_tensors:
        filled with the adapter's own tensors on the way). Collective, as full_fp32_params."""
        weights = self.full_fp32_params()
        return weights if self.adapter is None else merged_weights(weights, self.adapter, adapter_tensors)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Forwards inside run the base model alone: the adapters (and modules_to_save copies) are
        bypassed, not removed, so a preference objective's reference log-probs come from the
        frozen base without a second model. Works at every ZeRO stage (under ZeRO-3 the base's
        partitions are gathered by the same hooks); wrap the forward in torch.no_grad()."""
        if self.adapter is None:
            raise RuntimeError(f"stage {self.stage.name} trains no adapter: there are no adapters to disable")
        with self.module.disable_adapter():
            yield

    def full_fp32_params(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 weight on CPU) one parameter at a time (all, or those named), in name
        order, from the optimizer's fp32 master copy where one exists (a frozen parameter has
        none: its module weight, gathered under ZeRO-3). Collective under ZeRO-1..3: every rank
        runs it to the end and gets every value; no rank ever holds more than one full tensor."""
        params = dict(self.module.named_parameters())
        if self.frozen_names and self.stage.zero_stage == 3:
            # Parameters the last forward prefetched are still in flight, and gathering one asserts
            # ("Cannot partition a param in flight", DeepSpeed 0.19.8): release them first.
            self.engine.empty_partition_cache()
        for name in sorted(params if names is None else names):
            param = params[name]
            if hasattr(param, "ds_id") and not param.requires_grad:
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.detach().float().cpu().clone()
            else:
                full = safe_get_full_fp32_param(param)
            yield name, (param if full is None else full).detach().float().cpu()

    def weights_digest(self, names: list[str] | None = None) -> str:
        """WeightsDigest of the full fp32 weights: of the model the handoff holds (model_weights:
        with an adapter, merged), or of the engine's parameters named. Collective."""
        digest = WeightsDigest()
        for name, weight in self.model_weights() if names is None else self.full_fp32_params(names):
            digest.update(name, weight)
        return digest.hexdigest()

    def frozen_digest(self) -> str:
        """Digest of the frozen parameters' full values, 'none' when every parameter trains. Collective."""
        return self.weights_digest(self.frozen_names) if self.frozen_names else "none"

    def total_params(self) -> int:
        """Elements of every parameter (ZeRO-3's ds_numel is the full size of a partitioned one)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def optimizer_state_digest(self) -> str:
        """Digest of every rank's optimizer state tensors (Adam moments, SGD momentum, ...), in
        rank order; 'empty' before any step. Layout-dependent (flat ZeRO partitions), which is
        enough: moments are only carried between identical layouts."""
        base = self.base_optimizer
        local = xxhash.xxh3_128()
        tensors = 0
        # The state itself, in the order it was created, not through param_groups: ZeRO-3 empties
        # a sub-group's "params" after stepping it (DeepSpeed 0.19.8 stage3._optimizer_step).
        for state in base.state.values():
            for key, value in sorted(state.items()):
                if torch.is_tensor(value) and value.numel() > 1:
                    local.update(key.encode())
                    local.update(value.detach().float().cpu().contiguous().numpy().tobytes())
                    tensors += 1
        per_rank = self.all_gather_object((tensors, local.hexdigest()))
        if sum(count for count, _ in per_rank) == 0:
            return "empty"
        return xxhash.xxh3_128("".join(d for _, d in per_rank).encode()).hexdigest()

    # ---- small collectives ------------------------------------------------
    def all_reduce_sum(self, values: list[float | torch.Tensor]) -> list[float]:
        """Sums across ranks. Values may be device tensors (e.g. a step's losses): they are read
        once here, not after every micro step, so the host does not wait on the GPU mid-step."""
        tensor = torch.stack([torch.as_tensor(v, device=self.device).detach().double().reshape(()) for v in values])
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any_rank(self, flag: bool) -> bool:
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order (small picklable values)."""
        per_rank: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(per_rank, value)
        return per_rank

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def device_memory(self) -> dict[str, int]:
        """GPU memory now and at its peak since the stage began (empty on CPU), for memory records."""
        if self.device.type != "cuda":
            return {}
        return {"gpu_allocated_bytes": torch.cuda.memory_allocated(), "gpu_peak_bytes": torch.cuda.max_memory_allocated()}

    def close(self) -> None:
        """Tear the engine down so the next stage of the launch can build its own: DeepSpeed's
        hooks removed and buffers unpinned (engine.destroy frees no tensors by itself), and every
        reference this object holds dropped; release_memory() then returns the memory."""
        self.engine.destroy()
        self.engine = None
        self._hf_ds_config = None  # transformers' ZeRO-3 switch (a weak reference) goes with it


def release_memory() -> None:
    """Between two stages of a launch: free what the finished stage left (cycles between the
    engine, its optimizer and the module need the collector), empty the accelerator's cache, and
    give freed heap pages back to the system so RSS shows what is really held."""
    gc.collect()
    deepspeed.get_accelerator().empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def exit_launch(code: int) -> None:
    """Leave without interpreter teardown: about 1 in 6 two-rank ZeRO-3 CPU runs aborted
    (exit 250) in teardown after finishing; a final barrier plus os._exit removed it."""
    if code == 0:
        dist.barrier()
    os._exit(code)


def _scale_lrs(groups: list[dict[str, Any]]) -> None:
    """Each group's lr x its multiplier (the scheduler, or the config, set the same lr in every group)."""
    for group in groups:
        group["lr"] = group["lr"] * group["lr_scale"]


class WeightsDigest:
    """xxh3-128 over names, shapes and fp32 bytes of tensors fed one by one in name order: the
    manifest's weight digest, computed while the weights stream past. A check of integrity, not
    of authenticity: xxh3 hashes 21 GB/s here against 1.5 GB/s for sha256, and every transition
    digests the weights at both ends."""

    def __init__(self):
        self._hash = xxhash.xxh3_128()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().float().cpu().contiguous()
        self._hash.update(f"{name}:{tuple(tensor.shape)}".encode())
        self._hash.update(tensor.numpy().data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
