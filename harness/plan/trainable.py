"""Which parameters a phase (or multistep stage) trains: selectors of parts and layers, learning
rate groups, and LoRA adapters on a frozen base (resolved against the model in harness/stages)."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from harness.plan.fields import Strict

# A selector of parameters: a shortcut, a layer range, a regex, or a glob (see TrainableSpec).
SELECTOR_SHORTCUTS = ("all", "embeddings", "head", "norms")
LAYER_RANGE = re.compile(r"layers\[(-?\d*)(:(-?\d*))?\]")


def _check_selector(selector: str) -> str:
    """A selector whose syntax is valid (whether it matches parameters is checked with the model)."""
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as error:
            raise ValueError(f"a valid regular expression after 're:' ({error})") from None
    elif selector.startswith("layers[") and ((match := LAYER_RANGE.fullmatch(selector)) is None or match[2] is None and not match[1]):
        raise ValueError("a layer range like layers[:2] (first 2), layers[-2:] (last 2), layers[1:3] or layers[0]")
    elif not selector.strip():
        raise ValueError("a non-empty selector")
    return selector


Selector = Annotated[str, AfterValidator(_check_selector)]


ALL_LINEAR = "all-linear"


def _check_target(selector: str) -> str:
    return selector if selector == ALL_LINEAR else _check_selector(selector)


class AdapterSpec(Strict):
    """Low-rank adapters on a frozen base (peft's LoRA): each targeted linear layer W gets two small
    matrices A (r x in) and B (out x r), B starting at zero, and computes W x + (alpha / r) B A x.
    Only the adapters (and modules_to_save) train and hold optimizer state. Every stage's handoff
    is the merged model (W + (alpha / r) B A, the same Hugging Face files as a full stage) plus the
    stage's `adapter/` folder, which `peft.PeftModel.from_pretrained(base, adapter/)` loads. The next
    stage carries the adapters and their moments when its adapter block is the same, else it
    starts from the merged weights."""

    type: Literal["lora", "qlora"] = "lora"
    """lora. qlora (a 4-bit base) needs bitsandbytes on CUDA and is not built here yet: a plan error."""
    r: int = Field(16, ge=1)
    """Rank of the adapter matrices."""
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training."""
    targets: list[Annotated[str, AfterValidator(_check_target)]] = [ALL_LINEAR]
    """The linear layers that get adapters: `all-linear` (every nn.Linear but the output head, as
    peft's all-linear), or the selectors `train` takes (`layers[-2:]`, `*.self_attn.*`, `re:...`):
    a layer is targeted when one of its parameters matches."""
    modules_to_save: list[Selector] = []
    """Modules trained fully next to the adapters (peft's modules_to_save: a trainable copy saved
    in the adapter folder), e.g. [head]; selected as `train` selects, a module when one of its
    parameters matches. None may also be a target."""


class TrainableSpec(Strict):
    """Which parameters a phase (or a multistep stage) trains, and at what learning rate; every
    other parameter is frozen for it (out of the optimizer, unchanged, no penalty). A selector is
    one of: `all`; `embeddings` (token and position embeddings); `head` (the output head; on a model
    with tied embeddings it is the shared matrix); `norms` (every normalization layer); `layers[a:b]`
    (decoder layers by index, Python slice: layers[:2] first 2, layers[-2:] last 2, layers[3]);
    `re:<regex>` (matched against the whole parameter name); anything else is a glob on the
    parameter name (`*.mlp.*`). Shortcuts are found from the model itself (its embedding modules,
    output embeddings, norm classes, decoder layer list), so they work for Llama, Qwen2, GPT-2 and
    similar families. A selector that matches no parameter is a plan error that lists real names."""

    train: list[Selector] = ["all"]
    """Parameters that train: the union of these selectors."""
    freeze: list[Selector] = []
    """Parameters taken out of `train` again (e.g. train [all], freeze [embeddings])."""
    lr_scale: dict[Selector, float] = {}
    """Learning-rate multiplier per selector, e.g. {embeddings: 0.1}; a parameter may match one entry
    at most. The stage's scheduler scales every group alike."""
    layer_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise lr decay: decoder layer k (1..L, from the bottom) trains at lr x layer_decay^(L-k),
    the embeddings at lr x layer_decay^L, the head and final norm at lr. Multiplies lr_scale."""

    adapter: AdapterSpec | None = None
    """Train low-rank adapters (LoRA, with the `peft` library) on a frozen base instead of the
    parameters themselves (see AdapterSpec). `train` and `freeze` then keep their defaults (the
    base is frozen; train a part of it fully with adapter.modules_to_save); lr_scale and
    layer_decay apply to the adapter's parameters (lr_scale: {head: 0.1} to a modules_to_save
    head, {"re:.*lora_B.*": 4} to the B matrices)."""

    @field_validator("lr_scale")
    @classmethod
    def _positive_scales(cls, scales: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in scales.items() if not v > 0}
        if bad:
            raise ValueError(f"multipliers > 0 (freeze a part with `freeze:` instead); got {bad}")
        return scales

    @model_validator(mode="after")
    def _adapter_trains_alone(self) -> TrainableSpec:
        if self.adapter is not None and (self.train != ["all"] or self.freeze):
            given = f"train {self.train}" if self.train != ["all"] else f"freeze {self.freeze}"
            raise ValueError(f"{given} with adapter: with an adapter the base is frozen and the adapter trains; leave train and freeze "
                             "unset, narrow adapter.targets, or train a base module fully with adapter.modules_to_save")
        return self

    @property
    def is_default(self) -> bool:
        """Every parameter trains, in one group at the stage's lr."""
        return self == TrainableSpec()
