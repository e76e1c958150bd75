"""Conversations as users have them, rendered with the tokenizer's chat template, and where in a
rendered row the loss goes: the rows that fine-tuning (harness/objectives/finetune.py) reads
through a template.

Row shapes (DataSpec.rows) read as conversations:
  alpaca           instruction, optional input, output, optional system and history. Read as chat
                   messages: [system], a user/assistant pair per history entry, then
                   user = instruction (+ blank line + input when there is one), assistant = output
  chat             `messages`: [{role, content}], roles system, user, assistant; or sharegpt's
                   `conversations`: [{from, value}], from human, gpt, system

Messages are rendered with the tokenizer's chat template, or BUILTIN_CHAT_TEMPLATE when it has none:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}</s>

(each turn is `<|role|>`, a newline and its content; an assistant turn ends with the tokenizer's
end-of-sequence token, others with a newline; a generation prompt is `<|assistant|>\\n`). The loss
covers every assistant turn: its content and whatever the template closes it with (the built-in
template: end-of-sequence), so the model learns to stop. No torch: the launch side checks sample
rows with it (harness/objectives/samples.py); the store builder (harness/jobs/store_builder.py)
renders every row through `encode_conversations` with the tokenizer it loaded.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from harness.objectives.base import DataProblem, RowProblem

# Roles a template knows, by the names rows use for them (sharegpt: human, gpt).
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
CHAT_COLUMNS = ("messages", "conversations")  # chat rows' column when messages_field is unset

BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' else '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# A rendered conversation with, per assistant turn, (start, content_end, end) character positions:
# the loss covers start..end; start..content_end is the turn's content, content_end..end the
# template's end of turn.
Spans = list[tuple[int, int, int]]
# The chat template: (messages, add_generation_prompt) -> text.
Render = Callable[[list[dict[str, str]], bool], str]


def messages_of(row: dict[str, Any], spec) -> list[dict[str, str]]:
    """An alpaca or chat row as chat messages [{role, content}] with roles system, user, assistant;
    raises RowProblem."""
    messages = _alpaca_messages(row, spec) if spec.rows == "alpaca" else _chat_messages(row, spec)
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise RowProblem("a system message only as the first message", f"has one as message {roles.index('system', 1)}")
    first = 1 if roles[0] == "system" else 0
    if "assistant" not in roles:
        raise RowProblem("at least one assistant message (the turns with loss)", f"has roles {roles}")
    if roles[first] != "user":
        raise RowProblem("a user message before the first assistant message", f"has roles {roles}")
    return messages


def _text(row: dict[str, Any], column: str, optional: bool = False) -> str:
    value = row.get(column)
    if value is None and optional:
        return ""
    if value is None:
        raise RowProblem(f"rows with a column {column!r}", f"has none; its columns: {sorted(k for k, v in row.items() if v is not None)}")
    if not isinstance(value, str):
        raise RowProblem(f"text in column {column!r}", f"holds {value!r}")
    return value


def _alpaca_messages(row: dict[str, Any], spec) -> list[dict[str, str]]:
    messages = []
    system = _text(row, spec.system_field, optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get(spec.history_field) or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise RowProblem(f"a list of [instruction, response] pairs of text in column {spec.history_field!r}", f"holds {history!r}")
    for instruction, response in history:
        messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    instruction, extra = _text(row, spec.instruction_field), _text(row, spec.input_field, optional=True)
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _text(row, spec.output_field)})
    return messages


def _chat_messages(row: dict[str, Any], spec) -> list[dict[str, str]]:
    column = spec.messages_field or next((c for c in CHAT_COLUMNS if row.get(c) is not None), None)
    if column is None:
        raise RowProblem("a column 'messages' ([{role, content}]) or 'conversations' (sharegpt: [{from, value}])",
                         f"has neither; its columns: {sorted(k for k, v in row.items() if v is not None)}")
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise RowProblem(f"a non-empty list of messages in column {column!r}", f"holds {turns!r}")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem("messages that are objects {role, content} or {from, value}", f"holds {turn!r} as message {k}")
        # sharegpt spells them from/value; files mixing both spellings give every message all four keys
        role_key, content_key = ("from", "value") if turn.get("role") is None and turn.get("from") is not None else ("role", "content")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ROLES:
            raise RowProblem(f"roles the chat template knows: {', '.join(ROLES)}", f"has {role_key} {role!r} in message {k}")
        if not isinstance(content, str):
            raise RowProblem(f"text in each message's {content_key!r}", f"holds {content!r} in message {k}")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def render_with_spans(messages: list[dict[str, str]], render: Render) -> tuple[str, Spans]:
    """The conversation as the template renders it, and the spans of its assistant turns. A turn's
    span is what rendering it adds after the generation prompt of the turns before it. Raises
    RowProblem when the template does not render a conversation as a continuation of its first
    turns (one that rewrites earlier turns: the trained positions could not be found)."""
    text = render(messages, False)
    spans: Spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise RowProblem("a chat template that renders a conversation as a continuation of its first turns",
                             f"has turn {i}, which changes how the turns before it render")
        content = message["content"].strip()
        found = through.find(content, len(before)) if content else len(before)
        content_end = found + len(content) if found >= 0 else len(through)  # a template that rewrites content: all of it
        spans.append((len(before), content_end, len(through)))
    return text, spans


def give_chat_template(tokenizer) -> None:
    """Conversations are rendered with the tokenizer's own chat template; one without gets the
    built-in template, which save_pretrained then writes with the handoff model
    (chat_template.jinja), so generation after training renders prompts the same way."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE


def encode_conversations(conversations: list[list[dict[str, str]]], tokenizer, first_row: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each conversation rendered with the tokenizer's chat template (the
    built-in one when it has none): loss mask 1 on every assistant turn's content, 2 on its end of
    turn, 0 elsewhere. first_row: the number of the first conversation, for messages. Raises
    RowProblem for a conversation the template does not render."""
    import jinja2

    give_chat_template(tokenizer)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    texts, spans = [], []
    for k, messages in enumerate(conversations):
        try:
            text, turn_spans = render_with_spans(messages, render)
        except jinja2.TemplateError as error:  # a template's raise_exception: e.g. roles that do not alternate
            raise DataProblem(f"row {first_row + k}: a conversation the tokenizer's chat template renders (it says: {error})") from None
        texts.append(text)
        spans.append(turn_spans)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [(e.ids, loss_mask(e.offsets, s)) for e, s in zip(encodings, spans)]


def loss_mask(offsets: list[tuple[int, int]], spans: Spans) -> list[int]:
    """Per token, by the character it starts at: 1 inside an assistant turn's content, 2 in its end of
    turn, 0 elsewhere. The spans are ordered and disjoint, so a token's place among their boundaries
    (start, content_end, end, start, ...) says which: index 1 of 3 content, 2 end of turn, 0 outside."""
    bounds = np.array([b for span in spans for b in span], np.int64)
    place = np.searchsorted(bounds, np.array([start for start, _ in offsets], np.int64), side="right") % 3
    return place.tolist()
