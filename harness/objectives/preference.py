"""Preference optimization, launch side: pairs of a chosen and a rejected response to one prompt,
trained with DPO, IPO, SimPO or ORPO (plan.PreferenceSpec). A pair is two consecutive rows of the
token store, chosen at 2i and rejected at 2i + 1, whose prompt is the same tokens; the loss mask
covers each response and its end of turn (1 its content, 2 its end, as fine-tune rows). A sample
is a pair. Its rank side: harness/worker/objectives/preference.py.

Row shapes (DataSpec.rows preference, implied on a preference phase when unset):
  text       prompt, chosen and rejected text columns (prompt_field, chosen_field, rejected_field):
             prompt + response + end-of-sequence, no template, as prompt_response fine-tune rows
             and TRL's standard form
  messages   chosen and rejected as message lists that begin with the same messages: those are the
             prompt (UltraFeedback; a prompt column that repeats them is not read). Lists that share
             nothing follow a prompt column of messages, or of text as one user message (TRL's
             conversational form)
  sharegpt   a chat column (conversations or messages) holding the prompt, with chosen and rejected
             one message each, {from, value} or {role, content} (LLaMA-Factory's dpo_en_demo.json)
Message rows are rendered with the chat template like chat rows (harness/objectives/chat.py: roles,
text parts, tool calls and the tools column), with loss on the response's assistant turns only.
A pair whose prompt leaves no token of a response within seq_len is refused after tokenizing
(built_store_problems), before anything is written or launched.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from harness.objectives import chat
from harness.objectives.base import DataProblem, Objective, RowEncoder, RowProblem, text_encoder
from harness.objectives.chat import Conversation
from harness.objectives.samples import count_rows
from harness.objectives.task_metrics import metric_keys
from harness.plan import DataSpec, TrainSettings
from harness.records.token_store import LOSS_MASK, OFFSETS, reference_file

# The step and eval metrics, by the names TRL's DPOTrainer logs (train/<name> each step, eval/<name> at eval).
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
# Rows of the loss mask read at a time when checking prompt lengths (bounded memory for any store).
CHECK_ROWS = 1 << 16

Pair = tuple[str, str, str] | tuple[Conversation, Conversation]
"""A row read as a pair: (prompt, chosen, rejected) texts, or the two conversations (chat template)."""


def pair_of(row: dict[str, Any], spec: DataSpec) -> Pair:
    """A preference row as a pair of texts or of conversations (see the module's shapes); raises RowProblem."""
    chosen, rejected = (_column(row, column) for column in (spec.chosen_field, spec.rejected_field))
    has_chat = spec.messages_field is not None or any(row.get(c) is not None for c in chat.CHAT_COLUMNS)
    prompt = row.get(spec.prompt_field)
    if isinstance(chosen, str) and isinstance(rejected, str) and not has_chat and not isinstance(prompt, list):
        if not isinstance(prompt, str):
            raise RowProblem(f"text in column {spec.prompt_field!r} beside text in {spec.chosen_field!r} and {spec.rejected_field!r}",
                             f"holds {prompt!r}" if prompt is not None else f"has none; its columns: {_columns(row)}")
        if chosen == rejected:
            raise RowProblem("a chosen response that differs from the rejected one", f"has {chosen!r} as both")
        return prompt, chosen, rejected
    return _conversations(row, spec, chosen, rejected)


def _column(row: dict[str, Any], column: str) -> Any:
    if row.get(column) is None:
        raise RowProblem(f"rows with a column {column!r} (a preference pair: chosen and rejected)", f"has none; its columns: {_columns(row)}")
    return row[column]


def _columns(row: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None)


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    """A chosen or rejected column as messages: a list of them, one message, or text (one assistant message)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [chat.message_of(value, f"column {column!r}")]
    if not isinstance(value, list) or not value:
        raise RowProblem(f"in column {column!r}: text, a message, or a non-empty list of messages", f"holds {value!r}")
    return [chat.message_of(turn, f"message {k} of {column!r}") for k, turn in enumerate(value)]


def _context(row: dict[str, Any], spec: DataSpec) -> list[dict[str, Any]]:
    """The messages before the responses when chosen and rejected do not hold them: the chat column,
    else the prompt column (messages, or text as one user message)."""
    if spec.messages_field is not None or any(row.get(c) is not None for c in chat.CHAT_COLUMNS):
        return chat.chat_messages(row, spec)
    prompt = row.get(spec.prompt_field)
    if isinstance(prompt, list):
        return [chat.message_of(turn, f"message {k} of {spec.prompt_field!r}") for k, turn in enumerate(prompt)]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else []


def _conversations(row: dict[str, Any], spec: DataSpec, chosen_value: Any, rejected_value: Any) -> tuple[Conversation, Conversation]:
    chosen, rejected = _messages(chosen_value, spec.chosen_field), _messages(rejected_value, spec.rejected_field)
    shared = next((k for k, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    if chosen == rejected:
        raise RowProblem("a chosen response that differs from the rejected one", "has the same messages in both")
    if shared in (len(chosen), len(rejected)):
        raise RowProblem("chosen and rejected conversations that each add a response after the messages they share",
                         f"has a {'chosen' if shared == len(chosen) else 'rejected'} conversation that is the start of the other")
    prompt = chosen[:shared] if any(m["role"] == "user" for m in chosen[:shared]) else _context(row, spec) + chosen[:shared]
    for name, response in ((spec.chosen_field, chosen[shared:]), (spec.rejected_field, rejected[shared:])):
        if response[0]["role"] != "assistant":
            raise RowProblem("responses that begin with an assistant message where chosen and rejected part",
                             f"has a {response[0]['role']} message there in {name!r}")
    chat.check_turns(prompt + chosen[shared:])
    tools = chat.tools_of(row, spec)
    return Conversation(prompt + chosen[shared:], tools, len(prompt)), Conversation(prompt + rejected[shared:], tools, len(prompt))


class Preference(Objective):
    kind = "preference"
    label = "preference"
    samples_are_rows = True  # a sample is a pair: global_batch and epochs count pairs
    rows_per_sample = 2
    loss_mask = True
    metric_prefix = "pref"
    perplexity = False

    def required_columns(self, spec: DataSpec) -> list[str]:
        return [spec.chosen_field, spec.rejected_field]

    def structured_rows(self, spec: DataSpec) -> bool:
        return True

    def row_problem(self, row: dict[str, Any], spec: DataSpec) -> RowProblem | None:
        try:
            pair_of(row, spec)
        except RowProblem as problem:
            return problem
        return None

    def key_fields(self, spec: DataSpec) -> list:
        """The columns and the built-in template (a tokenizer's own is in the tokenizer's identity)."""
        columns = [spec.prompt_field, spec.chosen_field, spec.rejected_field, spec.messages_field, spec.tools_field]
        return ["pairs", columns, hashlib.sha256(chat.BUILTIN_CHAT_TEMPLATE.encode()).hexdigest()[:16]]

    def encoder(self, spec: DataSpec, tokenizer) -> RowEncoder:
        """Two store rows per pair, chosen then rejected: text pairs as prompt + response +
        end-of-sequence, conversations through the chat template, loss on the response."""
        encode, eos = text_encoder(tokenizer), tokenizer.eos_token_id

        def pairs(batch: dict[str, list], first_row: int) -> list[tuple[list[int], list[int]]]:
            read = []
            for k, values in enumerate(zip(*batch.values())):
                try:
                    read.append(pair_of(dict(zip(batch, values)), spec))
                except RowProblem as problem:
                    raise DataProblem(f"row {first_row + k}: {problem.expected} (it {problem.found})") from None
            texts = [k for k, pair in enumerate(read) if isinstance(pair[0], str)]
            conversations = [k for k, pair in enumerate(read) if isinstance(pair[0], Conversation)]
            encoded: dict[int, list[tuple[list[int], list[int]]]] = {}
            if texts:
                prompts, chosen, rejected = (encode([read[k][j] for k in texts]) for j in range(3))
                for k, p, c, r in zip(texts, prompts, chosen, rejected):
                    encoded[k] = [(p + response + [eos], [0] * len(p) + [1] * len(response) + [2]) for response in (c, r)]
            if conversations:
                rows = chat.encode_conversations([c for k in conversations for c in read[k]], tokenizer, first_row,
                                                 row_of=lambda j: first_row + conversations[j // 2])
                for n, k in enumerate(conversations):
                    encoded[k] = rows[2 * n: 2 * n + 2]
            return [row for k in range(len(read)) for row in encoded[k]]

        return pairs

    def eval_keys(self, settings: TrainSettings) -> list[str]:
        return [f"eval/{name}" for name in REWARD_METRICS] + metric_keys(settings.task_metrics)

    def stage_notes(self, settings: TrainSettings, precision: str, store: Path, start_digest: str | None, spec: DataSpec) -> list[str]:
        """Where the reference log-probabilities come from (dpo and ipo): reused when the file for
        these start weights is there, else computed by the stage's ranks before its first step."""
        if not settings.preference.uses_reference:
            return [f"reference: none ({settings.preference.loss} is reference-free)"]
        pairs = f"{count_rows(spec):,} pairs" if spec.hub is None else "every pair"
        if start_digest is not None and reference_file(store, start_digest, settings.seq_len, precision).is_file():
            return [f"reference: reused ({pairs}, {reference_file(store, start_digest, settings.seq_len, precision)})"]
        known = "" if start_digest is not None else "; the start weights are known once the previous stage is done"
        return [f"reference: computed at start ({pairs}, one forward per pair on the stage's ranks{known})"]

    def built_store_problems(self, store: Path, settings: TrainSettings) -> list[tuple[int, str, str]]:
        """Pairs whose prompt is not shorter than seq_len (nothing of a response would be trained):
        (pair number, what is expected, what it has) of the first one, and how many more."""
        offsets = np.memmap(store / OFFSETS, np.int64, mode="r")
        mask = np.memmap(store / LOSS_MASK, np.uint8, mode="r")
        too_long: list[tuple[int, int]] = []
        for first in range(0, len(offsets) - 1, CHECK_ROWS):
            starts = np.asarray(offsets[first: first + CHECK_ROWS + 1])
            trained = np.flatnonzero(np.asarray(mask[starts[0]: starts[-1]])) + starts[0]
            prompt = trained[np.minimum(np.searchsorted(trained, starts[:-1]), len(trained) - 1)] - starts[:-1]
            too_long += [((first + r) // 2, int(prompt[r])) for r in np.flatnonzero(prompt >= settings.seq_len)]
        if not too_long:
            return []
        pair, length = too_long[0]
        more = len({p for p, _ in too_long}) - 1
        return [(pair, f"prompts shorter than seq_len ({settings.seq_len} tokens), so each response has tokens to train",
                 f"has a prompt of {length} tokens" + (f"; {more} more pair(s) too" if more else ""))]


PREFERENCE = Preference()

