"""`python -m harness.jobs.param_table` (a ModelSpec as JSON on stdin): prints the model's parameter
table (harness/stages/params.py) as JSON, from the architecture built on the meta device (no
weight read or allocated), so the names are exactly those of `named_parameters()` on the ranks.
The roles the trainable shortcuts select come from the model itself (its nn.Embedding modules,
its output embeddings, its norm classes, its decoder layer list).
"""
from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from harness.plan import ModelSpec
from harness.stages.params import ParamInfo, ParamTable
from harness.worker.model import architecture, load_tokenizer


def table_of(model) -> ParamTable:
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
    spec = ModelSpec.model_validate_json(sys.stdin.read())
    tokenizer = load_tokenizer(spec.tokenizer) if spec.builtin is not None else None
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(architecture(spec, tokenizer))
    model.tie_weights()  # as the worker builds it: a tied head is one parameter, the embeddings'
    print(json.dumps(table_of(model).model_dump(mode="json")))


if __name__ == "__main__":
    main()
