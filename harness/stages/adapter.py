"""A stage's adapter (trainable.adapter), resolved on the launch side against the base model's
parameter table: which linear layers get LoRA matrices and which modules train fully next to
them, as module names. The worker applies exactly these with peft (harness/worker/adapter.py);
the trainable set is then resolved against the table of the model with the adapter applied.
A selector that matches nothing or no linear layer, a module both targeted and saved, or qlora
on CPU is a plan problem naming the field. Pure; no torch.
"""
from __future__ import annotations

from typing import Any, Literal

from harness.plan import ALL_LINEAR, AdapterSpec
from harness.records import Adapter
from harness.stages.params import ParamInfo, ParamTable
from harness.stages.trainable import selected

Problems = list[tuple[str, Any, str]]


def module_of(param: ParamInfo) -> str:
    """The module a parameter belongs to: its name without the last part ('.weight', '.bias')."""
    return param.name.rsplit(".", 1)[0]


def resolve_adapter(spec: AdapterSpec, table: ParamTable, accelerator: Literal["cpu", "cuda"]) -> tuple[Adapter | None, Problems]:
    """The adapter's target and saved modules in model order, or None and its problems as (field
    under the stage's block, value, allowed). Selectors name parameters as trainable's do."""
    problems: Problems = []
    if spec.type == "qlora":
        why = ("lora on CPU: qlora keeps the base in 4 bits with bitsandbytes, whose kernels need CUDA" if accelerator == "cpu"
               else "lora: qlora (a 4-bit bitsandbytes base) is not built in this harness yet")
        problems.append(("trainable.adapter.type", spec.type, why))
    linear = [p for p in table.params if p.linear]
    targets: list[str] = []
    for k, selector in enumerate(spec.targets):
        field = f"trainable.adapter.targets[{k}]"
        if selector == ALL_LINEAR:  # as peft's all-linear: every linear layer but the output head
            found = [p for p in linear if "head" not in p.roles]
        else:
            matched = selected(selector, table)
            found = [p for p in matched if p.linear]
            if not matched:
                problems.append((field, selector, f"a selector that matches linear layers of this model ({_linear_hint(linear)})"))
            elif not found:
                problems.append((field, selector, f"a selector of linear layers, which LoRA adapts (it matches only "
                                                  f"{', '.join(p.name for p in matched[:3])}{', ...' if len(matched) > 3 else ''})"))
        targets += [m for m in dict.fromkeys(map(module_of, found)) if m not in targets]
    saved: list[str] = []
    for k, selector in enumerate(spec.modules_to_save):
        field = f"trainable.adapter.modules_to_save[{k}]"
        matched = selected(selector, table)
        if not matched:
            problems.append((field, selector, f"a selector that matches parameters of this model ({_linear_hint(linear)})"))
        both = [m for m in dict.fromkeys(map(module_of, matched)) if m in targets]
        if both:
            problems.append((field, selector, f"modules that are not also in trainable.adapter.targets ({both[0]} is in both: a "
                                              "module either gets an adapter or trains fully)"))
        saved += [m for m in dict.fromkeys(map(module_of, matched)) if m not in saved]
    if problems:
        return None, problems
    order = {module_of(p): i for i, p in reversed(list(enumerate(table.params)))}
    return Adapter(type="lora", r=spec.r, alpha=spec.alpha, dropout=spec.dropout, targets=sorted(targets, key=order.__getitem__),
                   modules_to_save=sorted(saved, key=order.__getitem__)), []


def _linear_hint(linear: list[ParamInfo]) -> str:
    """The linear layers there are, with each decoder layer's index as *."""
    names = list(dict.fromkeys(module_of(p) if p.layer is None else module_of(p).replace(f".{p.layer}.", ".*.", 1) for p in linear))
    return f"linear layers: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
