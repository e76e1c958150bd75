"""Fine-tune rows that cannot be trained on as the plan says are refused before anything is
written or launched (exit 2), naming the file, the row (line) and what was expected: a missing
column, a row that is not valid JSON (JSON Lines or a JSON array), an empty file, a role the chat
template does not know, a conversation without an assistant turn. Rows past the checked sample are
found by the store builder, still before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bad_input import refused, write_lines
from test_plan_errors import with_change


def chat(*turns: tuple[str, str], key: str = "messages", role: str = "role", content: str = "content") -> str:
    return json.dumps({key: [{role: r, content: c} for r, c in turns]})


GOOD_CHAT = [chat(("user", f"Repeat w{k}."), ("assistant", f"w{k}")) for k in range(20)]
GOOD_ALPACA = [{"instruction": f"Repeat w{k}.", "input": "", "output": f"w{k}"} for k in range(20)]


def sft(tmp_path: Path, name: str, lines: list[str], **data) -> tuple[dict, Path]:
    """The plan with its fine-tune phase reading a file of these lines."""
    path = write_lines(tmp_path / name, lines)
    return with_change("phases.1.data", {"files": [str(path)], **data}), path


def alpaca_array(rows: list) -> list[str]:
    return json.dumps(rows, indent=2).splitlines()


@pytest.mark.parametrize("role, expected", [
    (("role", "narrator"), "has role 'narrator' in message 1"),
    (("from", "bot"), "has from 'bot' in message 1"),
])
def test_a_role_the_template_does_not_know_is_refused_with_the_line(tmp_path, role, expected):
    key, name = role
    bad = json.dumps({"messages": [{"role": "user", "content": "Q"}, {key: name, ("content" if key == "role" else "value"): "A"}]})
    plan, path = sft(tmp_path, "chat.jsonl", GOOD_CHAT[:3] + [bad] + GOOD_CHAT, rows="chat")
    refused(tmp_path, plan, f"phases[1].data.files[0]: '{path}' -> roles the chat template knows: system, user, assistant, tool, human, gpt, observation, function_call (line 4 {expected})")


def test_a_conversation_without_an_assistant_turn_is_refused(tmp_path):
    plan, path = sft(tmp_path, "chat.jsonl", GOOD_CHAT[:1] + [chat(("system", "S"), ("user", "Q"))] + GOOD_CHAT, rows="chat")
    refused(tmp_path, plan, f"'{path}' -> at least one assistant message (the turns with loss) (line 2 has roles ['system', 'user'])")


def test_chat_rows_without_messages_name_the_columns_and_the_shape_that_reads_them(tmp_path):
    plan, path = sft(tmp_path, "rows.jsonl", [json.dumps(r) for r in GOOD_ALPACA], rows="chat")
    refused(tmp_path, plan, f"'{path}' -> a column 'messages' ([{{role, content}}]) or 'conversations' (sharegpt: [{{from, value}}]) "
                            "(line 1 has neither; its columns: ['input', 'instruction', 'output'])")
    plan, path = sft(tmp_path, "rows.jsonl", [json.dumps(r) for r in GOOD_ALPACA])
    refused(tmp_path, plan, "rows with a column 'prompt' (line 1 has none; its columns: ['input', 'instruction', 'output']; `rows: alpaca` reads these)")


def test_alpaca_json_array_without_the_output_column_is_refused_with_row_and_line(tmp_path):
    rows = GOOD_ALPACA[:2] + [{"instruction": "Q", "input": ""}] + GOOD_ALPACA
    plan, path = sft(tmp_path, "alpaca.json", alpaca_array(rows), rows="alpaca")
    refused(tmp_path, plan, f"'{path}' -> rows with a column 'output' (row 3 (line 12) has none; its columns: ['input', 'instruction'])")


def test_invalid_json_in_a_json_array_is_refused_with_row_and_line(tmp_path):
    lines = alpaca_array(GOOD_ALPACA)
    assert lines[6:8] == ["  {", '    "instruction": "Repeat w1.",']
    lines[7] = lines[7].rstrip(",")  # row 2 loses the comma after its instruction
    plan, path = sft(tmp_path, "alpaca.json", lines, rows="alpaca")
    refused(tmp_path, plan, f"'{path}' -> a JSON array of row objects (row 2 at line 7 is not valid JSON: Expecting ',' delimiter at line 9 column 5)")


def test_empty_chat_and_alpaca_files_are_refused(tmp_path):
    plan, path = sft(tmp_path, "chat.jsonl", ["", ""], rows="chat")
    refused(tmp_path, plan, f"'{path}' -> a file with rows (this one is empty)")
    plan, path = sft(tmp_path, "alpaca.json", ["[", "]"], rows="alpaca")
    refused(tmp_path, plan, f"'{path}' -> a JSON array with rows (this one is empty)")


def test_a_bad_row_past_the_checked_sample_is_refused_by_the_store_builder_before_anything_is_written(tmp_path):
    lines = [chat(("user", f"Repeat w{k}."), ("assistant", f"w{k}")) for k in range(1200)]
    lines[1100] = chat(("user", "Q"), ("narrator", "A"))
    plan, _ = sft(tmp_path, "chat.jsonl", lines, rows="chat")
    plan["cache_dir"] = str(tmp_path / "cache")
    refused(tmp_path, plan, "row 1101: roles the chat template knows: system, user, assistant, tool, human, gpt, observation, function_call "
                            "(it has role 'narrator' in message 1)", command="run")
    assert not any((tmp_path / "cache" / "tokens").glob("finetune-*/meta.json")), "no fine-tune store was completed"
