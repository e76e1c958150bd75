"""Tokenizers without torch: the built-in byte tokenizer and a local tokenizer folder. The token
store builder (harness/jobs/store_builder.py) imports only this, so it starts in well under a
second (harness/worker/model.py, which imports torch and builds models, takes about 3 s)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


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


def load_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """'bytes' (the built-in byte tokenizer) or a local tokenizer folder, with a pad token."""
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer  # imports torch: only for a folder

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
