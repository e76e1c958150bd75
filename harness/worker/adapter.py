"""Adapters on the rank side (trainable.adapter, peft 0.21.2 LoRA): the model wrapped before the
engine is built, the merged weights streamed one module at a time, and the adapter folder that
`peft.PeftModel.from_pretrained(base, adapter/)` loads.

Merging happens here, while the handoff streams the gathered fp32 weights, not with peft's
merge_and_unload: PEFT's docs say merging under DeepSpeed raises, and under ZeRO-3 no rank may
hold the whole model. The adapter folder is written from the gathered tensors too, not with
PeftModel.save_pretrained, which saved empty adapters under ZeRO-3 (peft #2892 / trl #4416).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from harness.records import Adapter, FileCheck, file_check
from harness.stages import Stage

PREFIX = "base_model.model."
"""What PeftModelForCausalLM puts before the base model's parameter names."""
ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
"""What peft writes into an adapter folder next to adapter_model.safetensors."""
# A parameter peft added or moved: <module>.<part>.<weight|bias>.
_WRAPPED = re.compile(rf"(?P<module>.+)\.(?P<part>base_layer|lora_A\.{ADAPTER_NAME}|lora_B\.{ADAPTER_NAME}|original_module|"
                      rf"modules_to_save\.{ADAPTER_NAME})\.(?P<leaf>[^.]+)")


def with_adapter(model: torch.nn.Module, adapter: Adapter, seed: int) -> PeftModel:
    """The model with the stage's adapter applied (its base frozen, the LoRA matrices and
    modules_to_save copies trainable), before deepspeed.initialize. Seeded, so every rank and
    every rerun draws the same A matrices (B starts at zero); under ZeRO-3 the new parameters are
    whole until the engine partitions them, and the modules_to_save copies are made by peft from
    the gathered module."""
    torch.manual_seed(seed)
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=list(adapter.targets),
                        modules_to_save=list(adapter.modules_to_save) or None, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapted(model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
    """The stage's model with its adapter applied, or as it is when the stage trains none."""
    adapter = stage.trainable.adapter if stage.trainable else None
    return model if adapter is None else with_adapter(model, adapter, stage.settings.seed)


def base_name(name: str, adapter: Adapter) -> str | None:
    """The base model's name of a parameter of the adapted model, None for what the merged model
    does not hold (LoRA matrices, the frozen original of a modules_to_save copy)."""
    name = name.removeprefix(PREFIX)
    match = _WRAPPED.fullmatch(name)
    if match is None:
        return name
    module, part = match["module"], match["part"]
    keeps = (part == "base_layer" and module in adapter.targets) or (part.startswith("modules_to_save") and module in adapter.modules_to_save)
    return f"{module}.{match['leaf']}" if keeps else None


def merged_shapes(shapes: dict[str, tuple[int, ...]], adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Shapes of the merged model's parameters, from those of the adapted model."""
    return {merged: shape for name, shape in shapes.items() if (merged := base_name(name, adapter)) is not None}


def merged_weights(weights: Iterator[tuple[str, torch.Tensor]], adapter: Adapter, trained: dict[str, torch.Tensor] | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, merged fp32 weight) in name order, from the adapted model's full weights in name
    order (DeepSpeedStrategy.full_fp32_params): a targeted layer's W + (alpha / r) B A, as peft's
    merge computes it, a modules_to_save copy under the module's own name, the rest as they are.
    Holds one layer's W and A until its B arrives (a module's parameters come together in name
    order: base_layer < lora_A < lora_B). trained: filled with the adapter's own tensors (LoRA
    matrices, modules_to_save copies) under their adapted names, for the adapter folder."""
    held: dict[str, torch.Tensor] = {}
    for name, weight in weights:
        match = _WRAPPED.fullmatch(name.removeprefix(PREFIX))
        part = match["part"] if match else None
        if trained is not None and part is not None and part != "base_layer" and part != "original_module":
            trained[name] = weight
        if part in (f"lora_A.{ADAPTER_NAME}", f"lora_B.{ADAPTER_NAME}") or (part == "base_layer" and match["leaf"] == "weight"):
            held[part] = weight
            if len(held) == 3:
                a, b = held[f"lora_A.{ADAPTER_NAME}"], held[f"lora_B.{ADAPTER_NAME}"]
                yield f"{match['module']}.weight", held["base_layer"] + (b @ a) * adapter.scale
                held = {}
            continue
        merged = base_name(name, adapter)
        if merged is not None:
            yield merged, weight
    if held:
        raise RuntimeError(f"the adapter's weights ended inside a layer: {sorted(held)} without the rest of the layer")


def write_adapter_folder(folder: Path, model: PeftModel, trained: dict[str, torch.Tensor], base: str | None) -> dict[str, FileCheck]:
    """adapter_config.json and adapter_model.safetensors as peft saves them (its own key names),
    from the gathered tensors; base: the folder of the model the adapter applies to (recorded as
    base_model_name_or_path). Returns each file's check, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, state_dict={k: v.contiguous() for k, v in trained.items()}, save_embedding_layers=False)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    return {path.name: file_check(path) for path in sorted(folder.iterdir())}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (its config and generation config), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
