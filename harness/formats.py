"""Fine-tune rows as users have them, read as conversations, and where in a rendered row the loss goes.

Row shapes (DataSpec.rows):
  prompt_response  two text columns, trained as prompt + response + end-of-sequence (no template;
                   the store builder tokenizes the two columns itself)
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
template: end-of-sequence), so the model learns to stop. Pure: no torch, no tokenizer; the launch
side checks sample rows with it (harness/data_check.py), the store builder renders every row.
"""
from __future__ import annotations

from typing import Any, Callable

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


class RowProblem(ValueError):
    """A row that does not read as its shape: what was expected, and what the row holds instead."""

    def __init__(self, expected: str, found: str):
        super().__init__(f"{expected} ({found})")
        self.expected, self.found = expected, found


def uses_template(spec) -> bool:
    """Whether a fine-tune data set's rows are rendered with a chat template (alpaca and chat rows)."""
    return spec.rows in ("alpaca", "chat")


def required_columns(spec, kind: str) -> list[str]:
    """The columns every row of a data set must have (chat rows with messages_field unset: none,
    each row names its own of CHAT_COLUMNS)."""
    if kind == "pretrain":
        return [spec.text_field]
    return {"prompt_response": [spec.prompt_field, spec.response_field],
            "alpaca": [spec.instruction_field, spec.output_field],
            "chat": [spec.messages_field] if spec.messages_field else []}[spec.rows]


def row_problem(row: dict[str, Any], spec, kind: str) -> RowProblem | None:
    """What keeps one row (a dict of columns) from being trained on as the data set says; None if nothing."""
    if kind == "finetune" and uses_template(spec):
        try:
            messages_of(row, spec)
        except RowProblem as problem:
            return problem
        return None
    for column in required_columns(spec, kind):
        if column not in row:
            return RowProblem(f"rows with a column {column!r}", f"has none; its columns: {sorted(row)}{_shape_hint(row, kind)}")
        if not isinstance(row[column], str):
            return RowProblem(f"text in column {column!r}", f"holds {row[column]!r}")
    return None


def _shape_hint(row: dict[str, Any], kind: str) -> str:
    if kind != "finetune":
        return ""
    if any(row.get(column) is not None for column in CHAT_COLUMNS):
        return "; `rows: chat` reads these"
    if "instruction" in row and "output" in row:
        return "; `rows: alpaca` reads these"
    return ""


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
