"""Conversations as users have them, rendered with the tokenizer's chat template, and where in a
rendered row the loss goes: the rows that fine-tuning (harness/objectives/finetune.py) reads
through a template.

Row shapes (DataSpec.rows) read as conversations:
  alpaca           instruction, optional input, output, optional system and history. Read as chat
                   messages: [system], a user/assistant pair per history entry, then
                   user = instruction (+ blank line + input when there is one), assistant = output
  chat             `messages`: [{role, content}], roles system, user, assistant, tool; or sharegpt's
                   `conversations`: [{from, value}], from human, gpt, system, function_call, observation
  preference       pairs of responses to one conversation (harness/objectives/preference.py)

Tool calls (chat and preference rows): an assistant message's OpenAI-style `tool_calls`
([{type: function, function: {name, arguments}}]) or a sharegpt `function_call` message (its value
the call as JSON: {"name", "arguments"}, or a list of them) is an assistant turn that calls tools;
a `tool` message (sharegpt: `observation`) holds a tool's result. The row's `tools` column
(DataSpec.tools_field: a list of JSON schemas, or that list as JSON text) lists what may be called.
Both go to the template's own tool support (apply_chat_template's `tools=` and each message's
`tool_calls`); a template that drops them is refused (tool_support_problem). A message's content
may be a list of text parts ([{type: text, text: ...}], or `value` for `text`), joined; any other
part (an image) is refused: these are text models.

Messages are rendered with the tokenizer's chat template, or BUILTIN_CHAT_TEMPLATE when it has none:

    <|tools|>\\n{tools as JSON}\\n                  (only when the row has tools)
    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<|call|>{call as JSON}...</s>
    <|tool|>\\n{content}\\n

(each turn is `<|role|>`, a newline and its content; an assistant turn ends with its tool calls
and the tokenizer's end-of-sequence token, others with a newline; a generation prompt is
`<|assistant|>\\n`). The loss covers every assistant turn (a preference pair's: only its response):
its content and tool calls, and whatever the template closes it with (the built-in template:
end-of-sequence), so the model learns to stop; tool results, like user turns, have none. No
torch: the launch side checks sample rows with it (harness/objectives/samples.py); the store
builder (harness/jobs/store_builder.py) renders every row through `encode_conversations` with
the tokenizer it loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from harness.objectives.base import DataProblem, RowProblem

# Roles a template knows, by the names rows use for them (sharegpt: human, gpt, observation; a
# sharegpt function_call is an assistant turn whose value is its tool calls).
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}
CHAT_COLUMNS = ("messages", "conversations")  # chat rows' column when messages_field is unset

BUILTIN_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|tools|>\\n' + (tools | tojson) + '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% if message.tool_calls is defined and message.tool_calls %}"
    "{% for call in message.tool_calls %}{{ '<|call|>' + (call['function'] | tojson) }}{% endfor %}"
    "{% endif %}"
    "{{ eos_token if message['role'] == 'assistant' else '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEXT_PARTS = "a string, or a list of text parts ([{type: text, text: ...}])"


@dataclass(frozen=True)
class Conversation:
    """A row read as chat messages ({role, content}, an assistant turn's tool_calls), the tools it may
    call (None: none listed), and the first message with loss: the turns before it are context
    (a preference pair's prompt), the assistant turns from it on are trained."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    trained_from: int = 0

# A rendered conversation with, per assistant turn, (start, content_end, end) character positions:
# the loss covers start..end; start..content_end is the turn's content, content_end..end the
# template's end of turn.
Spans = list[tuple[int, int, int]]
# The chat template: (messages, add_generation_prompt[, tools]) -> text.
Render = Callable[..., str]


def conversation_of(row: dict[str, Any], spec) -> Conversation:
    """An alpaca or chat row as a Conversation with roles system, user, assistant and tool; raises
    RowProblem."""
    messages = _alpaca_messages(row, spec) if spec.rows == "alpaca" else chat_messages(row, spec)
    check_turns(messages)
    return Conversation(messages, tools_of(row, spec))


def check_turns(messages: list[dict[str, Any]]) -> None:
    """A system message only first, a user message before the first assistant one, at least one
    assistant message; raises RowProblem."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise RowProblem("a system message only as the first message", f"has one as message {roles.index('system', 1)}")
    first = 1 if roles[:1] == ["system"] else 0
    if "assistant" not in roles:
        raise RowProblem("at least one assistant message (the turns with loss)", f"has roles {roles}")
    if roles[first:first + 1] != ["user"]:
        raise RowProblem("a user message before the first assistant message", f"has roles {roles}")


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


def chat_messages(row: dict[str, Any], spec) -> list[dict[str, Any]]:
    """The messages of a chat row's messages column (spec.messages_field, else whichever of
    CHAT_COLUMNS it has); raises RowProblem."""
    column = spec.messages_field or next((c for c in CHAT_COLUMNS if row.get(c) is not None), None)
    if column is None:
        raise RowProblem("a column 'messages' ([{role, content}]) or 'conversations' (sharegpt: [{from, value}])",
                         f"has neither; its columns: {sorted(k for k, v in row.items() if v is not None)}")
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise RowProblem(f"a non-empty list of messages in column {column!r}", f"holds {turns!r}")
    return [message_of(turn, f"message {k}") for k, turn in enumerate(turns)]


def message_of(turn: Any, where: str) -> dict[str, Any]:
    """One message ({role, content} or sharegpt's {from, value}) as {role, content[, tool_calls]}
    with a role the template knows; where: 'message 3', for messages. Raises RowProblem."""
    if not isinstance(turn, dict):
        raise RowProblem("messages that are objects {role, content} or {from, value}", f"holds {turn!r} as {where}")
    # sharegpt spells them from/value; files mixing both spellings give every message all four keys
    role_key, content_key = ("from", "value") if turn.get("role") is None and turn.get("from") is not None else ("role", "content")
    role, content = turn.get(role_key), turn.get(content_key)
    if role not in ROLES:
        raise RowProblem(f"roles the chat template knows: {', '.join(ROLES)}", f"has {role_key} {role!r} in {where}")
    if role == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _calls_in_text(content, where)}
    calls = turn.get("tool_calls")
    message = {"role": ROLES[role], "content": _text_of(content, content_key, where, empty_ok=bool(calls))}
    if calls:
        if message["role"] != "assistant":
            raise RowProblem("tool_calls on assistant messages only", f"has them on a {role} message ({where})")
        message["tool_calls"] = _tool_calls(calls, where)
    if message["role"] == "tool":  # templates that address results by call id or function name read these
        message.update({key: turn[key] for key in ("tool_call_id", "name") if isinstance(turn.get(key), str)})
    return message


def _text_of(content: Any, key: str, where: str, empty_ok: bool) -> str:
    """A message's text: a string, or its text parts joined; None only beside tool calls."""
    if isinstance(content, str):
        return content
    if content is None and empty_ok:
        return ""
    if not isinstance(content, list):
        raise RowProblem(f"text in each message's {key!r}: {TEXT_PARTS}", f"holds {content!r} in {where}")
    texts = []
    for part in content:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        text = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind != "text":
            raise RowProblem(f"text in each message's {key!r}: {TEXT_PARTS}",
                             f"has a part of type {kind!r} in {where}: only text is trained, these are text models" if kind
                             else f"holds {part!r} as a part of {where}")
        if not isinstance(text, str):
            raise RowProblem(f"text parts with a string 'text' (or 'value'): {TEXT_PARTS}", f"holds {part!r} in {where}")
        texts.append(text)
    return "".join(texts)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as templates take them: [{type: function, function: {name, arguments}}], arguments
    a mapping when they are JSON text of one (OpenAI sends text; transformers' templates expect a mapping)."""
    expected = "tool calls [{type: function, function: {name, arguments}}] (or {name, arguments} each)"
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise RowProblem(expected, f"holds {calls!r} in {where}")
    normalised = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(expected, f"holds {call!r} in {where}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
                arguments = parsed if isinstance(parsed, dict) else arguments
            except json.JSONDecodeError:
                pass
        normalised.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return normalised


def _calls_in_text(value: Any, where: str) -> list[dict[str, Any]]:
    """A sharegpt function_call message's value: its call(s) as JSON text."""
    try:
        calls = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        calls = None
    if not isinstance(calls, (dict, list)):
        raise RowProblem('a function_call message whose value is a call as JSON: {"name": ..., "arguments": {...}}', f"holds {value!r} in {where}")
    return _tool_calls(calls, where)


def tools_of(row: dict[str, Any], spec) -> list[dict[str, Any]] | None:
    """The row's tools column (spec.tools_field) as JSON schemas in the form templates take
    ({type: function, function: {...}}; a bare {name, description, parameters}, as LLaMA-Factory
    and glaive list them, is wrapped); None when the row has none. Raises RowProblem."""
    tools = row.get(spec.tools_field)
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise RowProblem(f"tools in column {spec.tools_field!r} as a list of JSON schemas (or JSON text of one)",
                             f"holds text that is not JSON ({error.msg})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RowProblem(f"tools in column {spec.tools_field!r} as a list of JSON schemas (or JSON text of one)", f"holds {tools!r}")
    return [tool if "type" in tool else {"type": "function", "function": tool} for tool in tools]


def has_tools(conversation: Conversation) -> bool:
    """Whether rendering it needs the template's tool support."""
    return bool(conversation.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation.messages)


def render_with_spans(conversation: Conversation, render: Render, eot: str = "") -> tuple[str, Spans]:
    """The conversation as the template renders it, and the spans of its trained assistant turns
    (from conversation.trained_from on). A turn's span is what rendering it adds after the
    generation prompt of the turns before it; its content ends where the template's end of turn
    (eot, see end_of_turn) begins for a turn that calls tools (its calls are content: they are what the model says).
    Raises RowProblem when the template does not render a conversation as a continuation of its
    first turns (one that rewrites earlier turns: the trained positions could not be found)."""
    messages = conversation.messages
    text = render(messages, False)
    spans: Spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < conversation.trained_from:
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise RowProblem("a chat template that renders a conversation as a continuation of its first turns",
                             f"has turn {i}, which changes how the turns before it render")
        content = message["content"].strip()
        if message.get("tool_calls"):
            content_end = len(through) - len(eot) if eot and through.endswith(eot) else len(through)
        else:
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


PROBE_CALL, PROBE_RESULT = "probe_tool_7q", "probe_result_7q"


def end_of_turn(render: Render) -> str:
    """What the template writes after an assistant turn's content (the built-in one: end-of-sequence;
    ChatML: '<|im_end|>\\n')."""
    text = render([{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE_RESULT}], False)
    return text[text.rfind(PROBE_RESULT) + len(PROBE_RESULT):]


def tool_support_problem(render: Render) -> str | None:
    """What keeps the template from rendering tool calls and their results (a template without tool
    support drops them, or raises); None when both show in a probe conversation."""
    tools = [{"type": "function", "function": {"name": PROBE_CALL, "description": "a probe", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": PROBE_CALL, "arguments": {}}}]},
                {"role": "tool", "content": PROBE_RESULT}, {"role": "assistant", "content": "a"}]
    try:
        text = render(messages, False, tools)
    except Exception as error:  # jinja2's errors, or a template's raise_exception
        return f"it raises on a tool call ({type(error).__name__}: {error})"
    missing = [what for what, marker in (("tool calls", PROBE_CALL), ("tool results", PROBE_RESULT)) if marker not in text]
    return f"it drops {' and '.join(missing)}" if missing else None


def encode_conversations(conversations: list[Conversation], tokenizer, first_row: int, row_of=None) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each conversation rendered with the tokenizer's chat template (the
    built-in one when it has none): loss mask 1 on every trained assistant turn's content, 2 on its
    end of turn, 0 elsewhere. first_row: the number of the first conversation's row, for messages
    (row_of(k): the row of conversation k, when rows give several). Raises DataProblem for a
    conversation the template does not render, or tool calls in a template without tool support."""
    import jinja2

    give_chat_template(tokenizer)
    row_of = row_of or (lambda k: first_row + k)

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)

    eot = end_of_turn(render)
    tools_checked = False
    texts, spans = [], []
    for k, conversation in enumerate(conversations):
        if not tools_checked and has_tools(conversation):
            problem = tool_support_problem(render)
            if problem is not None:
                name = "the built-in template" if tokenizer.chat_template == BUILTIN_CHAT_TEMPLATE else f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"
                raise DataProblem(f"row {row_of(k)}: tool calls, which {name} cannot render ({problem}): use a tokenizer whose chat "
                                  "template supports tools (apply_chat_template's tools= and tool_calls), or rows without them")
            tools_checked = True
        try:
            text, turn_spans = render_with_spans(conversation, lambda m, g: render(m, g, conversation.tools), eot)
        except jinja2.TemplateError as error:  # a template's raise_exception: e.g. roles that do not alternate
            raise DataProblem(f"row {row_of(k)}: a conversation the tokenizer's chat template renders (it says: {error})") from None
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
