"""Fine-tune rows as users have them: alpaca (one JSON array), chat messages and sharegpt, rendered
with a chat template into tokens and a loss mask, checked token by token; the held-out pairs that
generation reads; a tokenizer's own template; packing on the real tiny Llama (the same loss as
padded rows, no attention across rows). No launcher: the store builder and the rank-side readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import DATA
from harness.objectives.chat import BUILTIN_CHAT_TEMPLATE, conversation_of
from harness.plan import DataSpec, ModelSpec
from harness.jobs.store_builder import build
from harness.stages.stores import store_request
from harness.objectives import count_rows
from harness.worker.objectives import open_data
from harness.worker.objectives.finetune import eval_pairs
from harness.worker.data import IGNORE_INDEX, TokenizedSet
from harness.objectives.chat import give_chat_template
from harness.worker.model import build_model, byte_tokenizer
from harness.worker.objectives.finetune import keep_packed_rows_apart

ALPACA_JSON, CHAT_JSONL, SHAREGPT_JSONL = DATA / "alpaca.json", DATA / "chat.jsonl", DATA / "sharegpt.jsonl"
LONG = 512  # seq_len that cuts no row


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def open_rows(spec: DataSpec, cache: Path, tokenizer: str = "bytes", seq_len: int = LONG) -> TokenizedSet:
    """Build the store as the launch side does, open it as a rank does."""
    request = store_request("finetune", spec, tokenizer, str(cache), "data")
    build(request)
    return open_data(request, seq_len, 0, byte_tokenizer().pad_token_id)


def ids(text: str) -> list[int]:
    return byte_tokenizer().backend_tokenizer.encode(text, add_special_tokens=False).ids


def row_labels(data: TokenizedSet, r: int) -> tuple[list[int], list[int]]:
    """Tokens and labels of store row r (file order), unpadded."""
    arrays = data.samples.padded(np.array([r]))
    n = int(arrays["attention_mask"][0].sum())
    return arrays["input_ids"][0, :n].tolist(), arrays["labels"][0, :n].tolist()


def expected_labels(pieces: list[tuple[str, bool]], eos: int) -> tuple[list[int], list[int]]:
    """Tokens and labels of a row rendered as (text, trained) pieces; '</s>' is the eos token."""
    tokens, labels = [], []
    for text, trained in pieces:
        piece = [eos] if text == "</s>" else ids(text)
        tokens += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return tokens, labels


def test_multi_turn_chat_has_loss_on_every_assistant_turn_and_its_eos_only(tmp_path, tokenizer):
    data = open_rows(DataSpec(files=[str(CHAT_JSONL)], rows="chat"), tmp_path)
    first = json.loads(CHAT_JSONL.read_text().splitlines()[0])["messages"]  # system, user, assistant, user, assistant
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    system, user1, reply1, user2, reply2 = (m["content"] for m in first)
    tokens, labels = expected_labels([
        (f"<|system|>\n{system}\n<|user|>\n{user1}\n<|assistant|>\n", False), (reply1, True), ("</s>", True),
        (f"<|user|>\n{user2}\n<|assistant|>\n", False), (reply2, True), ("</s>", True)], tokenizer.eos_token_id)
    assert row_labels(data, 0) == (tokens, labels)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == f"{reply1}</s>{reply2}</s>"


def test_held_out_chat_pairs_are_the_conversation_up_to_the_last_assistant_turn_and_that_turn(tmp_path, tokenizer):
    data = open_rows(DataSpec(files=[str(CHAT_JSONL)], rows="chat"), tmp_path)
    rows = [json.loads(line)["messages"] for line in CHAT_JSONL.read_text().splitlines()]
    give_chat_template(tokenizer)
    for prompt, response in eval_pairs(data):
        row = next(m for m in rows if ids(m[-1]["content"]) == response and
                   tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) == tokenizer.decode(prompt))
        assert tokenizer.decode(prompt).endswith(f"{row[-2]['content']}\n<|assistant|>\n")
    assert len(eval_pairs(data)) == 2


def test_sharegpt_conversations_read_as_chat_messages(tmp_path, tokenizer):
    data = open_rows(DataSpec(files=[str(SHAREGPT_JSONL)], rows="chat"), tmp_path)
    first = json.loads(SHAREGPT_JSONL.read_text().splitlines()[0])["conversations"]
    assert [t["from"] for t in first] == ["human", "gpt"]
    tokens, labels = expected_labels([(f"<|user|>\n{first[0]['value']}\n<|assistant|>\n", False), (first[1]["value"], True), ("</s>", True)],
                                     tokenizer.eos_token_id)
    assert row_labels(data, 0) == (tokens, labels)


def test_alpaca_json_array_counts_its_rows_and_renders_input_system_and_history(tmp_path, tokenizer):
    spec = DataSpec(files=[str(ALPACA_JSON)], rows="alpaca")
    rows = json.loads(ALPACA_JSON.read_text())
    assert count_rows(spec) == len(rows) == 48 < len(ALPACA_JSON.read_text().splitlines()), "rows, not lines"
    data = open_rows(spec, tmp_path)
    assert data.samples.count == 48
    with_input, no_input, with_history = rows[0], rows[1], rows[2]
    assert with_input["input"] and not no_input["input"] and with_history["history"] and with_history["system"]
    eos = tokenizer.eos_token_id
    assert row_labels(data, 0) == expected_labels([
        (f"<|user|>\n{with_input['instruction']}\n\n{with_input['input']}\n<|assistant|>\n", False), (with_input["output"], True), ("</s>", True)], eos)
    assert row_labels(data, 1) == expected_labels([
        (f"<|user|>\n{no_input['instruction']}\n<|assistant|>\n", False), (no_input["output"], True), ("</s>", True)], eos)
    (old_q, old_a), = with_history["history"]
    assert row_labels(data, 2) == expected_labels([
        (f"<|system|>\n{with_history['system']}\n<|user|>\n{old_q}\n<|assistant|>\n", False), (old_a, True), ("</s>", True),
        (f"<|user|>\n{with_history['instruction']}\n<|assistant|>\n", False), (with_history["output"], True), ("</s>", True)], eos)


def test_prompt_response_columns_are_configurable_and_trained_as_before(tmp_path, tokenizer):
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"Q{k}? ", "answer": f"A{k}"}) + "\n" for k in range(20)))
    data = open_rows(DataSpec(files=[str(tmp_path / "qa.jsonl")], prompt_field="question", response_field="answer"), tmp_path / "c")
    assert row_labels(data, 3) == expected_labels([("Q3? ", False), ("A3", True), ("</s>", True)], tokenizer.eos_token_id)
    assert all(tokenizer.decode(r).startswith("A") for _, r in eval_pairs(data)), "the response, without its eos"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tokenizer_folder(folder: Path, template: str):
    """The byte tokenizer with this chat template, saved as a tokenizer folder; returns the tokenizer."""
    own = byte_tokenizer()
    own.chat_template = template
    own.save_pretrained(folder)
    return own


def test_a_tokenizers_own_chat_template_renders_the_rows_and_closes_turns_its_way(tmp_path, tokenizer):
    """A ChatML-style template (end of turn '<|im_end|>\\n', not eos): the loss covers each reply and its end of turn."""
    chatml, own = CHATML, tokenizer_folder(tmp_path / "tok", CHATML)
    data = open_rows(DataSpec(files=[str(SHAREGPT_JSONL)], rows="chat"), tmp_path / "c", str(tmp_path / "tok"))
    first = json.loads(SHAREGPT_JSONL.read_text().splitlines()[0])["conversations"]
    assert row_labels(data, 0) == expected_labels([(f"<|im_start|>user\n{first[0]['value']}<|im_end|>\n<|im_start|>assistant\n", False),
                                                   (f"{first[1]['value']}<|im_end|>\n", True)], tokenizer.eos_token_id)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    give_chat_template(loaded)
    assert loaded.chat_template == chatml, "a tokenizer's own template is kept"
    replies = {json.loads(line)["conversations"][1]["value"] for line in SHAREGPT_JSONL.read_text().splitlines()}
    for prompt, response in eval_pairs(data):
        assert own.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n") and own.decode(response) in replies, "the reply without its end of turn"


def test_the_built_in_template_is_saved_with_the_tokenizer(tmp_path, tokenizer):
    plain = byte_tokenizer()
    give_chat_template(plain)
    plain.save_pretrained(tmp_path / "handoff")
    again = AutoTokenizer.from_pretrained(tmp_path / "handoff")
    assert (tmp_path / "handoff" / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATE == again.chat_template
    messages = conversation_of(json.loads(CHAT_JSONL.read_text().splitlines()[1]), DataSpec(files=["x"], rows="chat")).messages
    assert again.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>\n")


# ---- packing, on the real tiny Llama ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    model = build_model(ModelSpec(builtin="tiny-llama"), byte_tokenizer(), seed=3, handoff_dir=None)
    keep_packed_rows_apart(model)
    return model.eval()


def test_packed_rows_share_one_sequence_with_positions_restarting_and_labels_unchanged(tmp_path):
    data = open_rows(DataSpec(files=[str(CHAT_JSONL)], rows="chat", packing=True), tmp_path, seq_len=128)
    rows = np.array([0, 1, 2, 3])
    packed, padded = data.samples.arrays(rows), data.samples.padded(rows)
    lengths = padded["attention_mask"].sum(1)
    assert set(packed) == {"input_ids", "labels", "position_ids"} and packed["input_ids"].shape == (1, lengths.sum())
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert packed["input_ids"][0].tolist() == [t for row, n in zip(padded["input_ids"], lengths) for t in row[:n]]
    assert packed["labels"][0].tolist() == [t for row, n in zip(padded["labels"], lengths) for t in row[:n]], "each row's first label is a prompt token anyway"
    assert (padded["attention_mask"] == 0).sum() > 0, "the padded layout pays for padding"


def test_packed_batch_has_the_loss_of_the_padded_batch(tmp_path, tiny_llama):
    data = open_rows(DataSpec(files=[str(CHAT_JSONL)], rows="chat", packing=True), tmp_path, seq_len=128)
    rows = data.order.at(np.arange(6))
    with torch.no_grad():
        packed = tiny_llama(**{k: torch.from_numpy(v) for k, v in data.samples.arrays(rows).items()}).loss
        padded = tiny_llama(**{k: torch.from_numpy(v) for k, v in data.samples.padded(rows).items()}).loss
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def test_packed_rows_do_not_attend_to_each_other(tiny_llama):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, 11), rng.integers(0, 256, 7)
    with torch.no_grad():
        alone = [tiny_llama(input_ids=torch.tensor([row])).logits[0] for row in (a, b)]
        def packed(first):
            batch = {"input_ids": torch.tensor([np.concatenate([first, b])]), "position_ids": torch.tensor([list(range(len(first))) + list(range(len(b)))])}
            return tiny_llama(**batch).logits[0]
        together = packed(a)
        other_first_row = packed(rng.integers(0, 256, 11))
    assert torch.allclose(together[:11], alone[0], atol=1e-5) and torch.allclose(together[11:], alone[1], atol=1e-5)
    assert torch.equal(other_first_row[11:], together[11:]), "the second row's outputs do not depend on the first row"
