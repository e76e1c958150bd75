"""Preference and tool-calling rows as users have them, without ranks: each preference shape (text
columns, UltraFeedback's message lists, LLaMA-Factory's sharegpt with chosen/rejected messages)
becomes two store rows per pair with the same prompt tokens and loss only on the response and its
end of turn; tool calls (sharegpt function_call/observation with a tools column, OpenAI tool_calls
and role tool, content as text parts) render through the template's own tool support with loss on
the calls and answers, none on tool results. Rows that cannot train, and preference settings where
they do not belong, are refused in-process with exit 2 naming the file, the line (or the field)
and what was expected, before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, make_plan, write_plan
from test_bad_input import write_lines
from test_formats import CHATML, expected_labels, tokenizer_folder
from test_plan_errors import multistep_phase

from harness.cli import main
from harness.jobs.store_builder import build
from harness.plan import DataSpec
from harness.stages.stores import store_request
from harness.worker.data import IGNORE_INDEX
from harness.worker.model import byte_tokenizer
from harness.worker.objectives import open_data

EOS = byte_tokenizer().eos_token_id
PAIR = {"prompt": "Q: shift abcd\nA: ", "chosen": "bcde", "rejected": "hijk"}
GOOD = [json.dumps(PAIR)] * 20


def open_store(kind: str, spec: DataSpec, cache: Path, seq_len: int = 512):
    request = store_request(kind, spec, "bytes", str(cache), "data")
    build(request)
    return open_data(request, seq_len, 0, byte_tokenizer().pad_token_id)


def row(samples, r: int) -> tuple[list[int], list[int]]:
    """Tokens and labels of store row r, unpadded."""
    arrays = samples.padded(np.array([r]))
    n = int(arrays["attention_mask"][0].sum())
    return arrays["input_ids"][0, :n].tolist(), arrays["labels"][0, :n].tolist()


@pytest.mark.parametrize("file, prompt", [
    ("cipher_pairs.jsonl", "{prompt}"),
    ("pairs_chat.jsonl", "<|user|>\n{user}\n<|assistant|>\n"),
    ("pairs_sharegpt.jsonl", "<|system|>\nYou answer with the shifted word.\n<|user|>\n{user}\n<|assistant|>\n"),
], ids=["text", "ultrafeedback", "llama-factory"])
def test_each_shape_stores_a_pair_as_two_rows_with_loss_on_the_response_only(tmp_path, file, prompt):
    data = open_store("preference", DataSpec(files=[str(DATA / file)]), tmp_path)
    first = json.loads((DATA / "cipher_pairs.jsonl").read_text().splitlines()[0])  # every example file holds these pairs
    text = prompt.format(prompt=first["prompt"], user=first["prompt"].strip())
    assert data.samples.count == 64 if file != "cipher_pairs.jsonl" else 400
    for r, response in ((0, first["chosen"]), (1, first["rejected"])):
        assert row(data.samples.rows, r) == expected_labels([(text, False), (response, True), ("</s>", True)], EOS)
    arrays = data.samples.arrays(np.array([0, 3]))
    assert arrays["input_ids"].shape == (2, 2, 512) and arrays["pair_index"].tolist() == [0, 3]
    chosen, rejected = (arrays["labels"][1, k] for k in (0, 1))
    prompt_length = int(np.argmax(chosen != IGNORE_INDEX))
    assert prompt_length == int(np.argmax(rejected != IGNORE_INDEX)) and (arrays["input_ids"][1, 0, :prompt_length] == arrays["input_ids"][1, 1, :prompt_length]).all()


def test_tool_calls_render_through_the_templates_tool_support_with_loss_on_calls_and_answers(tmp_path):
    """glaive/LLaMA-Factory sharegpt rows and OpenAI rows of the same conversations give the same tokens and loss."""
    stores = [open_store("finetune", DataSpec(files=[str(DATA / f"tools_{form}.jsonl")], rows="chat"), tmp_path / form) for form in ("sharegpt", "openai")]
    first = json.loads((DATA / "tools_sharegpt.jsonl").read_text().splitlines()[0])
    user, call, result, answer = (turn["value"] for turn in first["conversations"])
    tools = json.dumps([{"type": "function", "function": json.loads(first["tools"])[0]}])
    expected = expected_labels([(f"<|tools|>\n{tools}\n<|user|>\n{user}\n<|assistant|>\n", False), (f"<|call|>{call}", True), ("</s>", True),
                                (f"<|tool|>\n{result}\n<|assistant|>\n", False), (answer, True), ("</s>", True)], EOS)
    assert row(stores[0].samples, 0) == expected == row(stores[1].samples, 0)
    assert [stores[0].samples.store.row_with_mask(r)[1].tolist() for r in range(4)] == [stores[1].samples.store.row_with_mask(r)[1].tolist() for r in range(4)]


# ---- refused, in-process: exit 2 and nothing written ------------------------------------------

def refused_here(tmp_path: Path, plan: dict, capsys, *expected: str, command: str = "plan") -> str:
    out = tmp_path / "run"
    code = main([command, str(write_plan(tmp_path, plan)), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    for text in expected:
        assert text in stderr, stderr
    assert not out.exists(), "nothing is written"
    return stderr


def preference_plan(data: dict, **settings) -> dict:
    return make_plan("pref-refused", [{"name": "dpo", "kind": "preference", "data": data, "steps": 2, **settings}], port=30101)


@pytest.mark.parametrize("bad, expected", [
    ({"prompt": "Q", "chosen": "A"}, "rows with a column 'rejected' (a preference pair: chosen and rejected) (line 3 has none; its columns: ['chosen', 'prompt'])"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "a chosen response that differs from the rejected one (line 3 has 'A' as both)"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "narrator", "content": "B"}]},
     "roles the chat template knows: system, user, assistant, tool, human, gpt, observation, function_call (line 3 has role 'narrator' in message 1 of 'rejected')"),
    ({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}], "chosen": "A", "rejected": "B"},
     "(line 3 has a part of type 'image_url' in message 0 of 'prompt': only text is trained, these are text models)"),
], ids=["missing-rejected", "identical", "unknown-role", "image"])
def test_pairs_that_cannot_train_are_refused_with_the_file_and_line(tmp_path, capsys, bad, expected):
    path = write_lines(tmp_path / "pairs.jsonl", GOOD[:2] + [json.dumps(bad)] + GOOD)
    refused_here(tmp_path, preference_plan({"files": [str(path)]}), capsys, f"phases[0].data.files[0]: '{path}' -> ", expected)


def test_a_prompt_longer_than_seq_len_is_refused_after_tokenizing_before_anything_is_written(tmp_path, capsys):
    long = {**PAIR, "prompt": "Q: " + "x" * 70}
    path = write_lines(tmp_path / "pairs.jsonl", GOOD[:4] + [json.dumps(long)] + GOOD + [json.dumps(long)])
    plan = preference_plan({"files": [str(path)]}, seq_len=64)
    refused_here(tmp_path, plan, capsys, f"stage 'dpo' data: '{path}' -> prompts shorter than seq_len (64 tokens), so each response has tokens to "
                                         "train (line 5 has a prompt of 73 tokens; 1 more pair(s) too)", command="run")


def test_a_template_that_cannot_render_tools_is_refused_naming_it(tmp_path, capsys):
    tokenizer_folder(tmp_path / "tok", CHATML)  # ChatML without tool support: calls and results vanish
    plan = make_plan("no-tools", [{"name": "sft", "kind": "finetune", "steps": 2, "data": {"files": [str(DATA / "tools_openai.jsonl")], "rows": "chat"}}],
                     port=30102, cache_dir=str(tmp_path / "cache"))
    plan["model"]["tokenizer"] = str(tmp_path / "tok")
    refused_here(tmp_path, plan, capsys, f"row 1: tool calls, which the chat template of {tmp_path / 'tok'} cannot render (it drops tool calls)",
                 command="run")


MESSAGES = {"files": [str(DATA / "pairs_chat.jsonl")]}


@pytest.mark.parametrize("plan, expected", [
    (preference_plan({**MESSAGES, "packing": True}), "phases[0].data.packing: True -> false for preference rows"),
    (preference_plan({**MESSAGES, "rows": "chat"}), "phases[0].data.rows: 'chat' -> preference (or unset): a preference phase reads pairs"),
    (preference_plan(MESSAGES, preference={"loss": "dpo", "gamma": 0.5}),
     "phases[0].preference: {'loss': 'dpo', 'gamma': 0.5} -> dpo does not take ['gamma']; it takes beta and label_smoothing"),
    (make_plan("x", [{"name": "sft", "kind": "finetune", "steps": 2, "data": {"files": [str(DATA / "cipher.jsonl")]}, "preference": {"beta": 0.2}}], port=30103),
     "phases[0].preference: {'loss': 'dpo', 'beta': 0.2} -> a block of preference phases only (kind: preference); this phase is finetune"),
    (make_plan("x", [{"name": "sft", "kind": "finetune", "steps": 2, "data": {**MESSAGES, "rows": "preference"}}], port=30103),
     "phases[0].data.rows: 'preference' -> prompt_response, alpaca or chat for finetune data: preference rows train a phase of kind preference"),
    (make_plan("x", [multistep_phase("ms", [{"steps": 2, "data": "preference"}])], port=30103),
     "phases[0].stages[0].data: 'preference' -> pretrain, finetune or mix: a multistep stage draws its batches from its phase's pretrain and "
     "finetune data sets (preference pairs train in a phase of their own, kind: preference)"),
], ids=["packing", "rows", "knob", "block-on-finetune", "rows-on-finetune", "multistep-stage"])
def test_preference_settings_where_they_do_not_belong_are_plan_errors(tmp_path, capsys, plan, expected):
    refused_here(tmp_path, plan, capsys, expected)
