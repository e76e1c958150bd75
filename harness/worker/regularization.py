"""L1 and L2 penalties on the trained weights: loss += l1 * sum|w| + l2 * sum w^2 (frozen ones excluded).

ZeRO 0-2 keep full weights on every rank, so the penalty is a plain term of the
loss and autograd does the rest. Under ZeRO-3 each rank holds one shard of
each weight and the module's parameters are empty outside their forward, so
the penalty's gradient (l1 * sign(w) + 2 * l2 * w) is added to each rank's
gradient shard after backward, once per optimizer step, and its value is the
sum of the shards' partial sums across ranks. Both give the same update.

L2 as decoupled weight decay (l2_mode: weight_decay) is not here: it goes to
the optimizer's weight_decay in the DeepSpeed config.
"""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

from harness.plan import RegularizationSpec
from harness.worker.strategy import DeepSpeedStrategy


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


class NoRegularizer:
    """Stand-in when no penalty is configured."""

    def loss_term(self):
        return None

    def apply_to_gradients(self) -> None:
        pass

    def partial_sums(self) -> list:
        """This rank's part of the step's penalty sums, for the step's one all-reduce (train.py)."""
        return []

    def metrics(self, sums: list[float]) -> dict[str, float]:
        """The step's penalties from the all-reduced partial_sums, for the metrics row."""
        return {}

    def values(self) -> dict[str, float]:
        """Penalties on the current weights (the manifest's). Collective under ZeRO-3."""
        return {}


class Regularizer(NoRegularizer):
    def __init__(self, spec: RegularizationSpec, strategy: DeepSpeedStrategy):
        self.l1 = spec.l1
        self.l2 = spec.l2 if spec.l2_mode == "penalty" else 0.0
        self.strategy = strategy
        self.sharded = strategy.stage.zero_stage == 3
        # Frozen parameters are left alone, and so are biases and norm weights (1-D) unless asked.
        self.params = [p for p in strategy.module.parameters() if p.requires_grad and (spec.include_1d or len(_full_shape(p)) >= 2)]
        self._sums = (torch.zeros(()), torch.zeros(()))
        """sum|w| and sum w^2 of the last step: device tensors, read only when reduced."""

    def _weights(self) -> list[torch.Tensor]:
        """Full weights (ZeRO 0-2, autograd-connected) or this rank's fp32 shards (ZeRO-3)."""
        return [safe_get_local_fp32_param(p) for p in self.params] if self.sharded else self.params

    def partial_sums(self) -> list:
        """ZeRO-3: this rank's shard sums; ZeRO 0-2: the whole sums on rank 0, none elsewhere (every
        rank holds the same weights), so the all-reduced values are the exact totals either way."""
        if self.sharded or self.strategy.is_rank0:
            return list(self._sums)
        return [0.0, 0.0]

    def metrics(self, sums: list[float]) -> dict[str, float]:
        l1_sum, l2_sum = sums
        return {"train/l1_penalty": self.l1 * l1_sum, "train/l2_penalty": self.l2 * l2_sum}

    def loss_term(self):
        """The penalty as a differentiable loss term (ZeRO 0-2), or None under ZeRO-3."""
        if self.sharded:
            return None
        l1 = sum(w.abs().sum() for w in self.params)
        l2 = sum(w.pow(2).sum() for w in self.params)
        self._sums = (l1.detach(), l2.detach())
        return self.l1 * l1 + self.l2 * l2

    def apply_to_gradients(self) -> None:
        """ZeRO-3: add the penalty's gradient to each local gradient shard. Call after the last
        backward of a step and before the optimizer step."""
        if not self.sharded:
            return
        l1_sum = l2_sum = 0.0
        for param in self.params:
            weight = safe_get_local_fp32_param(param)
            grad = safe_get_local_grad(param)
            safe_set_local_grad(param, grad + self.l1 * torch.sign(weight) + 2 * self.l2 * weight)
            l1_sum = l1_sum + weight.abs().sum()
            l2_sum = l2_sum + weight.pow(2).sum()
        self._sums = (l1_sum, l2_sum)

    def values(self) -> dict[str, float]:
        """Penalties on the current weights, exact under every ZeRO stage. Collective."""
        with torch.no_grad():
            weights = self._weights()
            self._sums = (sum(w.abs().sum() for w in weights), sum(w.pow(2).sum() for w in weights))
        return self.metrics(self.strategy.all_reduce_sum(self.partial_sums()))


def make_regularizer(spec: RegularizationSpec, strategy: DeepSpeedStrategy) -> NoRegularizer:
    return Regularizer(spec, strategy) if spec.active else NoRegularizer()
