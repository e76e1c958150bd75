"""Model and tokenizer: built-in tiny Llama configs, local Hugging Face folders,
a byte-level tokenizer that needs no download, and the Hugging Face save."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from harness.plan import ModelSpec

# Llama-shaped configs small enough for CPU tests and the demo.
BUILTIN_CONFIGS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus <pad>, <s>, </s>: any text, no training, no network."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tokenizer(spec: ModelSpec, handoff_dir: Path | None) -> PreTrainedTokenizerFast:
    """The previous stage's tokenizer when there is one, else the plan's."""
    if handoff_dir is not None:
        return AutoTokenizer.from_pretrained(handoff_dir)
    if spec.tokenizer == "bytes":
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: ModelSpec, tokenizer, seed: int, handoff_dir: Path | None) -> torch.nn.Module:
    """fp32 model on CPU: from the handoff folder, the plan's folder, or a seeded built-in config.
    DeepSpeed casts and partitions it in initialize; loading full weights before that is
    the path that works for every ZeRO stage."""
    source = handoff_dir or (Path(spec.path) if spec.path else None)
    if source is not None:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **BUILTIN_CONFIGS[spec.builtin],
    )
    torch.manual_seed(seed)  # the same initial weights on every rank and every rerun
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_hf_model(folder: Path, model: torch.nn.Module, tokenizer, weights: dict[str, torch.Tensor]) -> None:
    """A Hugging Face folder (config, tokenizer, model.safetensors) from full fp32 weights.
    Written from a plain state dict, not save_pretrained on the engine's module, whose
    ZeRO-3 parameters are empty shards."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
