"""The model's parameters as the worker will see them (names, shapes, roles), for the launch side.

The table comes from a child process (harness/jobs/param_table.py: it imports torch and
transformers, the launch side never does), which builds the model's architecture on the meta
device: no weight is read or allocated, and the names are exactly those of `named_parameters()`
on the ranks. Names
in checkpoint files would not do: GPT-2's hub files lack the `transformer.` prefix, a tied head is
stored once or not at all, buffers are stored too, and transformers renames keys as it loads.
The roles the trainable shortcuts select come from the model itself (its nn.Embedding modules,
its output embeddings, its norm classes, its decoder layer list), so they hold for Llama, Qwen2,
GPT-2 and similar families. A stage with an adapter is resolved against the table of the model
with the adapter applied (peft's wrapper on the meta device): its real names and counts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


Role = Literal["embedding", "head", "norm"]


class ParamInfo(BaseModel):
    """One parameter of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: tuple[int, ...]
    roles: tuple[Role, ...] = ()
    """embedding (an nn.Embedding), head (the output embeddings; a tied matrix is both), norm."""
    layer: int | None = None
    """Index in the decoder layer list (0-based), None outside it."""
    linear: bool = False
    """It belongs to an nn.Linear: a layer LoRA can adapt (trainable.adapter.targets)."""
    adapter: bool = False
    """The adapter added it and trains it (LoRA matrices, modules_to_save copies): in the table of
    a model with its adapter applied (harness/jobs/param_table.py)."""

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class ParamTable(BaseModel):
    """Every parameter of the model, in named_parameters() order, and its number of decoder layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: tuple[ParamInfo, ...]
    num_layers: int
