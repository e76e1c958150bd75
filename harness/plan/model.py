"""The model block of a plan: which model trains, and its tokenizer."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from harness.plan.fields import Strict

BYTE_VOCAB = 259
"""Tokens of the built-in byte tokenizer: 256 bytes and <pad>, <s>, </s> (harness/worker/model.py)."""
# Llama-shaped configs small enough for CPU tests and the demo; their vocabulary is the tokenizer's.
BUILTIN_CONFIGS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
}


class ModelSpec(Strict):
    """Which model to train: a built-in tiny config, a local Hugging Face folder or a hub model id.
    After load_plan, path and tokenizer are local folders (or 'bytes'): the worker never downloads."""

    builtin: Literal["tiny-llama", "small-llama"] | None = None
    """A named Llama-shaped config built with transformers (random init)."""
    path: str | None = None
    """A local Hugging Face model folder (config.json + weights), or a hub model id 'org/name'
    when no such folder exists: resolved at plan load to its snapshot folder in the Hugging Face
    cache (HF_HOME / HF_HUB_CACHE), downloaded first unless HF_HUB_OFFLINE is set. Every node
    must see that folder (a shared cache on multi-node runs)."""
    tokenizer: str | None = None
    """'bytes' (built-in byte-level tokenizer), a tokenizer folder or hub id; unset: the model's
    own (its path's folder must hold tokenizer files), or bytes for a builtin model."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of model.builtin or model.path")
        return self
