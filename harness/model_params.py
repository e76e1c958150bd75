"""The model's parameters as the worker will see them (names, shapes, roles), for the launch side.

`read_param_table` runs this module as a child process (it imports torch and transformers; the
launch side never does), which builds the model's architecture on the meta device: no weight is
read or allocated, and the names are exactly those of `named_parameters()` on the ranks. Names
in checkpoint files would not do: GPT-2's hub files lack the `transformer.` prefix, a tied head is
stored once or not at all, buffers are stored too, and transformers renames keys as it loads.
The roles the trainable shortcuts select come from the model itself (its nn.Embedding modules,
its output embeddings, its norm classes, its decoder layer list), so they hold for Llama, Qwen2,
GPT-2 and similar families.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict

from harness.plan import ModelSpec

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


def read_param_table(model: ModelSpec) -> ParamTable:
    """The parameters of the plan's model, from a child process (about as long as importing transformers)."""
    result = subprocess.run([sys.executable, "-m", "harness.model_params"], input=model.model_dump_json(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"listing the model's parameters failed:\n{result.stderr[-2000:]}")
    return ParamTable.model_validate_json(result.stdout.strip().splitlines()[-1])


def _table_of(model) -> ParamTable:
    import torch

    roles: dict[int, list[str]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            role = "embedding"
        elif "norm" in type(module).__name__.lower():
            role = "norm"
        else:
            continue
        for param in module.parameters(recurse=False):
            roles.setdefault(id(param), []).append(role)
    head = model.get_output_embeddings()
    for param in head.parameters(recurse=False) if head is not None else ():
        roles.setdefault(id(param), []).append("head")
    # The decoder layers: the longest ModuleList of as many blocks as the config has layers.
    num_layers = getattr(model.config, "num_hidden_layers", None) or 0
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    layer_of = {id(p): i for i, block in enumerate(lists[0]) for p in block.parameters()} if lists else {}
    params = [ParamInfo(name=name, shape=tuple(p.shape), roles=tuple(roles.get(id(p), ())), layer=layer_of.get(id(p)))
              for name, p in model.named_parameters()]
    return ParamTable(params=tuple(params), num_layers=num_layers if lists else 0)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from harness.worker.model import architecture, load_tokenizer

    spec = ModelSpec.model_validate_json(sys.stdin.read())
    tokenizer = load_tokenizer(spec.tokenizer) if spec.builtin is not None else None
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(architecture(spec, tokenizer))
    model.tie_weights()  # as the worker builds it: a tied head is one parameter, the embeddings'
    print(json.dumps(_table_of(model).model_dump(mode="json")))


if __name__ == "__main__":
    main()
