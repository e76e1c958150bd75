"""Model and tokenizer: built-in tiny Llama configs, local Hugging Face folders,
a byte-level tokenizer that needs no download, and the Hugging Face save."""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights
from transformers.integrations import is_deepspeed_zero3_enabled

import xxhash

from harness.plan import BUILTIN_CONFIGS, ModelSpec
from harness.records import EmbeddingResize, FileCheck
from harness.worker.tokenizer import byte_tokenizer, load_tokenizer  # noqa: F401  (byte_tokenizer: model.byte_tokenizer, as before)


def build_tokenizer(spec: ModelSpec, handoff_dir: Path | None) -> PreTrainedTokenizerFast:
    """The previous stage's tokenizer when there is one, else the plan's."""
    if handoff_dir is not None:
        return AutoTokenizer.from_pretrained(handoff_dir)
    return load_tokenizer(spec.tokenizer)


def build_model(spec: ModelSpec, tokenizer, seed: int, handoff_dir: Path | None, load_weights: bool = True) -> torch.nn.Module:
    """fp32 model on CPU: from the handoff folder, the plan's folder, or a seeded built-in config.
    Under ZeRO-3 (while DeepSpeedStrategy holds its HfDeepSpeedConfig) transformers builds it
    partitioned under deepspeed.zero.Init and loads a folder's weights module by module; under
    ZeRO-0/1/2 each rank holds one copy. load_weights=False builds the folder's architecture
    with seeded weights without reading its weights: for a stage whose DeepSpeed checkpoint
    (resume, full_state) overwrites them anyway."""
    source = handoff_dir or (Path(spec.path) if spec.path else None)
    if source is not None and load_weights:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return _seeded_from_config(architecture(spec, tokenizer, source), seed)


def architecture(spec: ModelSpec, tokenizer, source: Path | None = None):
    """The model's config: a folder's config.json, else the built-in config sized to the tokenizer."""
    if source is not None or spec.path:
        return AutoConfig.from_pretrained(source or spec.path)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **BUILTIN_CONFIGS[spec.builtin],
    )


def _seeded_from_config(config, seed: int) -> torch.nn.Module:
    """The same initial weights on every rank, every rerun and every ZeRO stage. Under ZeRO-3,
    transformers 5.23 constructs without initializing, then initializes module by module
    (children first) on rank 0 and broadcasts; the plain path does the same (construct without
    init, then one initialize_weights pass in that order), so both draw the same numbers."""
    torch.manual_seed(seed)
    if is_deepspeed_zero3_enabled():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.initialize_weights()
    model.tie_weights()
    return model


def resize_embeddings(model: torch.nn.Module, resize: EmbeddingResize | None, seed: int) -> None:
    """Add the embedding (and output) rows the launch side decided (harness/stages/model_fit.py),
    started as transformers' resize_token_embeddings(mean_resizing=True) does: drawn around the old
    rows' mean with their covariance, from the stage's seed so every rank draws the same (under
    ZeRO-3 transformers gathers and partitions them). A model that has the rows (a resume) is kept."""
    if resize is None or model.get_input_embeddings().num_embeddings >= resize.rows_after:
        return
    torch.manual_seed(seed)
    model.resize_token_embeddings(resize.rows_after, mean_resizing=True)


def parameter_storage(model: torch.nn.Module) -> dict[str, int]:
    """Parameter elements this rank holds: `local` (its ZeRO-3 partitions, else whole tensors),
    `materialized` (elements in param.data: 0 for a model built partitioned) and the `total`."""
    local = materialized = total = 0
    for param in model.parameters():
        materialized += param.data.numel()
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        total += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    return {"local": local, "materialized": materialized, "total": total}


def save_hf_config(folder: Path, model: torch.nn.Module, tokenizer, dtype: torch.dtype) -> None:
    """Everything of a Hugging Face folder except the weights (see SafetensorsWriter)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.dtype = dtype  # the dtype the weight files hold, as save_pretrained records it
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
WEIGHTS_INDEX = "model.safetensors.index.json"


class SafetensorsWriter:
    """Writes weights as transformers lays them out, one tensor at a time and holding none:
    model.safetensors, or model-0000k-of-0000n.safetensors plus model.safetensors.index.json
    when they exceed max_shard_bytes. Which tensor goes to which file, and each file's header,
    follow from names, shapes and dtype, known before the first tensor arrives; tensors then
    come in name order. `checksums`: file name -> size and xxh3 of each file, from the bytes written."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int):
        for old in folder.glob("model*.safetensors*"):  # a shorter earlier attempt's shards
            old.unlink()
        self.folder, self.shapes, self.dtype = folder, shapes, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[str]] = [[]]
        size = 0
        for name in sorted(shapes):
            nbytes = self._nbytes(name)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        self.file_of = {name: file for file, names in zip(files, shards) for name in names}
        self.first = {names[0]: (file, names) for file, names in zip(files, shards)}
        self.pending = iter(sorted(shapes))
        self.checksums: dict[str, FileCheck] = {}
        self._out, self._hash, self._bytes, self._left = None, None, 0, 0

    def _nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.itemsize

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name != next(self.pending):
            raise ValueError(f"tensor {name} out of name order")
        if name in self.first:
            file, names = self.first[name]
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for n in names:
                header[n] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(self.shapes[n]), "data_offsets": [offset, offset + self._nbytes(n)]}
                offset += self._nbytes(n)
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
            self._file, self._out, self._hash, self._bytes, self._left = file, open(self.folder / file, "wb"), xxhash.xxh3_128(), 0, len(names)
            self._write(struct.pack("<Q", len(text)) + text)
        self._write(tensor.to(self.dtype).contiguous().view(torch.uint8).numpy().data)
        self._left -= 1
        if self._left == 0:
            self._out.close()
            self.checksums[self._file] = FileCheck(bytes=self._bytes, xxh3=self._hash.hexdigest())

    def _write(self, data) -> None:
        self._out.write(data)
        self._hash.update(data)
        self._bytes += memoryview(data).nbytes

    def close(self) -> None:
        """Writes the index (several files only); every tensor must have been added."""
        if next(self.pending, None) is not None:
            raise ValueError("the weights ended before every tensor was written")
        if len(self.first) > 1:
            total = sum(self._nbytes(name) for name in self.shapes)
            index = json.dumps({"metadata": {"total_size": total}, "weight_map": self.file_of}, indent=2, sort_keys=True) + "\n"
            (self.folder / WEIGHTS_INDEX).write_text(index)
            self.checksums[WEIGHTS_INDEX] = FileCheck(bytes=len(index.encode()), xxh3=xxhash.xxh3_128(index.encode()).hexdigest())


def hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a Hugging Face folder's safetensors weights, in name order, one at a time."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        file_of = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            file_of = {name: "model.safetensors" for name in f.keys()}
    with ExitStack() as files:
        opened = {}
        for name in sorted(file_of):
            if file_of[name] not in opened:
                opened[file_of[name]] = files.enter_context(safe_open(str(folder / file_of[name]), framework="pt"))
            yield name, opened[file_of[name]].get_tensor(name)
