"""The data blocks of a plan: one data set (files or a hub set, and how its rows read), or a
weighted mixture of several, and the pair a multistep phase alternates between."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from harness.plan.fields import Strict

MIX_CYCLE = 10_000
"""Samples in one cycle of a mixture (harness/stages/mixture.py): a source's share is counted in
1/MIX_CYCLE, so each source needs at least that share."""


class DataSource(Strict):
    """One data set of a weighted mixture (data.sources): where its rows are and its weight. How its
    rows read (columns, row shape, held-out share) comes from the data block around it, but for the
    fields given here."""

    files: list[str] = []
    """Files or globs, relative to the plan (as data.files)."""
    hub: str | None = None
    """A Hugging Face hub dataset name (as data.hub)."""
    split: str = "train"
    """hub: the split to read (as data.split)."""
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    """How this source's files read (as data.format; auto: by the suffix)."""
    text_field: str | None = None
    """pretrain: this source's text column, when it is not the data block's text_field."""
    weight: float = Field(gt=0)
    """Its share of the samples drawn, relative to the other sources' weights (0.7 and 0.3, or 7 and
    3). A pretrain sample is a block of seq_len tokens, so this is its share of the tokens."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if bool(self.files) == bool(self.hub):
            raise ValueError("give exactly one of files or hub")
        return self


class DataSpec(Strict):
    """One data set: local files (text, jsonl, parquet, compressed jsonl/text) or a hub name when online.
    Tokenized once into a token store (see harness/records/token_store.py) that every rank reads rows from."""

    files: list[str] = []
    """Files or globs ("shards/*.jsonl.gz"), relative to the plan; globs expand in sorted order."""
    hub: str | None = None
    """A Hugging Face hub dataset name, streamed while tokenizing (needs a network)."""
    split: str = "train"
    """hub: the split to read."""
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    """How the files read. text: plain text, one document per paragraph (blank-line separated); json:
    JSON Lines or one JSON array of rows; parquet. auto: from the first file's suffix (.jsonl and .json:
    json, .parquet: parquet, anything else: text), under a compression suffix such as .gz."""
    text_field: str = "text"
    """pretrain: the column with the text (json/parquet)."""
    prompt_field: str = "prompt"
    """finetune and preference: the column with the prompt."""
    response_field: str = "response"
    """finetune: the column with the response (the only tokens with loss)."""
    # ---- fine-tune row shapes and packing (harness/objectives/finetune.py and chat.py read the rows) ----
    rows: Literal["prompt_response", "alpaca", "chat", "preference"] = "prompt_response"
    """finetune: what a row holds. prompt_response: two text columns (prompt_field, response_field),
    trained as prompt + response + end-of-sequence, no template. alpaca: instruction, optional input,
    output, optional system and history. chat: a list of messages, {role, content} with roles
    system/user/assistant, or sharegpt's {from, value} with human/gpt/system. alpaca and chat rows
    are rendered with the tokenizer's chat template (the built-in one when it has none, saved with the
    handoff model), with loss on every assistant turn and the end-of-turn token that closes it; chat
    rows may hold tool calls (see harness/objectives/chat.py). preference (kind preference, and its
    only shape: left unset there, it is implied): a prompt with a chosen and a rejected response, as
    text columns (prompt_field, chosen_field, rejected_field: trained as prompt + response +
    end-of-sequence, no template, as prompt_response rows), as two message lists that share the
    prompt as their first messages (UltraFeedback), or as a chat column (sharegpt `conversations`)
    with chosen and rejected as one message each (LLaMA-Factory); message rows go through the chat
    template. Loss on each response and its end of turn."""
    instruction_field: str = "instruction"
    """alpaca: the column with the instruction (the user turn)."""
    input_field: str = "input"
    """alpaca: the optional column with more context, appended to the instruction after a blank line."""
    output_field: str = "output"
    """alpaca: the column with the response (the assistant turn)."""
    system_field: str = "system"
    """alpaca: the optional column with a system prompt."""
    history_field: str = "history"
    """alpaca: the optional column with earlier turns, a list of [instruction, response] pairs (trained too)."""
    messages_field: str | None = None
    """chat: the column with the messages; unset: 'messages' or 'conversations' (sharegpt), whichever a row has."""
    tools_field: str = "tools"
    """chat and preference: the optional column with the tools a conversation may call (a list of
    JSON schemas, or that list as a JSON string), passed to the chat template as `tools`."""
    chosen_field: str = "chosen"
    """preference: the column with the chosen response (text, one message, or the whole conversation)."""
    rejected_field: str = "rejected"
    """preference: the column with the rejected response (the same form as chosen)."""
    packing: bool = False
    """finetune: lay the rows of each micro batch end to end in one sequence, without padding; each
    row attends only to itself and its positions restart at 0 (flash attention's variable-length
    path on GPU when flash-attn is installed, a block-diagonal mask otherwise). Rows per step, epochs
    and the loss are unchanged; the compute padding took is gone (raise micro_batch to use it)."""
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    """Held-out share for evaluation (taken deterministically from the end after shuffling with the seed)."""
    eval_max_samples: int = Field(64, ge=1)
    """At most this many held-out samples (rows, or pretrain blocks of seq_len tokens)."""
    # ---- weighted mixtures (harness/stages/mixture.py; the rank side: harness/worker/mixture.py) ----
    sources: list[DataSource] = []
    """Several data sets drawn by weight instead of files or hub, e.g. [{files: [web/*.jsonl.gz],
    weight: 0.7}, {files: [code/*.parquet], weight: 0.3}]. Each source is tokenized into its own
    store and keeps its own held-out split and epoch order; the samples of every step are drawn in
    the sources' proportions, the same for every seed, in a fixed interleave (exact over each
    cycle of 10,000 samples). The stage's data position is the mixture's, so a resume or a later
    stage on the same mixture continues the same stream. The manifest records what each source gave
    (data_mix: samples, tokens, epochs); `harness plan` shows the epochs expected of each."""
    exhausted: Literal["repeat", "stop"] | None = None
    """sources: when a source has drawn all its training samples. repeat: it starts another epoch
    (up-sampled; its epochs are recorded); stop: the stage ends before the step that would start a
    source's second epoch. Unset: repeat, and `harness plan` warns when a source is expected to repeat."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if sum(map(bool, (self.files, self.hub, self.sources))) != 1:
            raise ValueError("give exactly one of files, hub or sources")
        if self.exhausted is not None and not self.sources:
            raise ValueError("exhausted applies to a mixture (sources)")
        total = sum(source.weight for source in self.sources)
        light = [k for k, source in enumerate(self.sources) if source.weight / total < 1 / MIX_CYCLE]
        if light:
            raise ValueError(f"sources[{light[0]}].weight is under 1/{MIX_CYCLE:,} of the weights' sum: give it more, or leave it out")
        return self

    def weighted_sets(self) -> list[tuple[DataSpec, float]]:
        """Each data set with its share of the samples: the sources of a mixture as whole data sets
        (the fields a source does not give are this block's), or this one with share 1."""
        if not self.sources:
            return [(self, 1.0)]
        total = sum(source.weight for source in self.sources)
        return [(self.model_copy(update={"files": s.files, "hub": s.hub, "split": s.split, "format": s.format,
                                         "text_field": s.text_field or self.text_field, "sources": [], "exhausted": None}), s.weight / total)
                for s in self.sources]

    def resolved_format(self) -> str:
        """'text', 'json' or 'parquet'; a compressed file by the suffix under .gz, .bz2, .xz or .zst."""
        if self.format != "auto" or not self.files:
            return self.format
        name = self.files[0].lower()
        for compressed in (".gz", ".bz2", ".xz", ".zst"):
            name = name.removesuffix(compressed)
        return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(name).suffix, "text")


class MixSpec(Strict):
    """How a multistep stage draws its batches when it trains on both data sets."""

    pretrain: float = Field(0.5, ge=0, le=1)
    """Share of steps that draw from the pretrain set."""
    finetune: float = Field(0.5, ge=0, le=1)
    """Share of steps that draw from the finetune set; the two shares sum to 1."""

    @model_validator(mode="after")
    def _sums_to_one(self) -> MixSpec:
        if abs(self.pretrain + self.finetune - 1.0) > 1e-6:
            raise ValueError(f"mix ratios must sum to 1, got {self.pretrain} + {self.finetune}")
        return self


class MultistepData(Strict):
    """Data of a multistep phase: both sets, and how stages mix them."""

    pretrain: DataSpec
    """Text the pretrain objective reads (packed blocks of seq_len)."""
    finetune: DataSpec
    """Rows the finetune objective reads (loss on responses only)."""
    mix: Literal["alternate"] | MixSpec = "alternate"
    """'alternate': steps alternate pretrain/finetune; or ratios, e.g. {pretrain: 0.7, finetune: 0.3}."""
