"""`python -m harness.jobs.param_table` ({"model": ModelSpec, "adapter": Adapter or null} as JSON on
stdin): prints the model's parameter table (harness/stages/params.py) as JSON, from the
architecture built on the meta device (no weight read or allocated), with the adapter applied by
the same code as on the ranks (harness/worker/adapter.py), so the names are exactly those of
`named_parameters()` on the ranks.
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
from harness.records import Adapter
from harness.stages.params import ParamInfo, ParamTable
from harness.worker.adapter import with_adapter
from harness.worker.model import architecture, load_tokenizer


def table_of(model, adapted: bool = False) -> ParamTable:
    """The table of a model; adapted: it carries an adapter, whose trainable parameters are marked."""
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
    # recurse: under an adapter the head is peft's wrapper, holding the original and its trained copy
    for param in head.parameters() if head is not None else ():
        roles.setdefault(id(param), []).append("head")
    linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    # The decoder layers: the longest ModuleList of as many blocks as the config has layers.
    num_layers = getattr(model.config, "num_hidden_layers", None) or 0
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    layer_of = {id(p): i for i, block in enumerate(lists[0]) for p in block.parameters()} if lists else {}
    params = [ParamInfo(name=name, shape=tuple(p.shape), roles=tuple(roles.get(id(p), ())), layer=layer_of.get(id(p)), linear=id(p) in linear,
                        adapter=adapted and p.requires_grad)
              for name, p in model.named_parameters()]
    return ParamTable(params=tuple(params), num_layers=num_layers if lists else 0)


def main() -> None:
    request = json.loads(sys.stdin.read())
    spec = ModelSpec.model_validate(request["model"])
    adapter = Adapter.model_validate(request["adapter"]) if request.get("adapter") else None
    tokenizer = load_tokenizer(spec.tokenizer) if spec.builtin is not None else None
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(architecture(spec, tokenizer))
        model.tie_weights()  # as the worker builds it: a tied head is one parameter, the embeddings'
        if adapter is not None:
            model = with_adapter(model, adapter, seed=0)
    print(json.dumps(table_of(model, adapted=adapter is not None).model_dump(mode="json")))


if __name__ == "__main__":
    main()
