"""Every fine-tune row shape through real fine-tune stages (one run, a phase per shape, 2 CPU ranks):
prompt/response under other column names, alpaca from one JSON array (its epoch counted in rows),
multi-turn chat with packing, sharegpt. The packed stage's first loss equals the loss of the same
rows padded, computed here from the model it started from; the chat template the stage trained
with is saved with its model and renders the held-out prompts it was evaluated on."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DATA, FINETUNE_JSONL, TOKEN_CACHE, harness, make_plan, manifests, metric_rows, write_plan
from harness.objectives.chat import BUILTIN_CHAT_TEMPLATE
from harness.plan import DataSpec
from harness.stages.stores import store_request
from harness.worker.objectives import open_data
from harness.worker.objectives.finetune import eval_pairs
from harness.worker.data import SampleStream, micro_batch_position
from harness.worker.model import byte_tokenizer

SEED, MICRO, RANKS = 1234, 4, 2
CHAT = {"rows": "chat", "packing": True}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("formats")
    renamed = folder / "qa.jsonl"
    pairs = [json.loads(line) for line in FINETUNE_JSONL.read_text().splitlines()[:48]]
    renamed.write_text("".join(json.dumps({"question": p["prompt"], "answer": p["response"]}) + "\n" for p in pairs))
    phases = [
        {"name": "pairs", "kind": "finetune", "steps": 2, "data": {"files": [str(renamed)], "prompt_field": "question", "response_field": "answer"}},
        {"name": "alpaca", "kind": "finetune", "epochs": 1, "data": {"files": [str(DATA / "alpaca.json")], "rows": "alpaca"}},
        {"name": "sharegpt", "kind": "finetune", "steps": 2, "data": {"files": [str(DATA / "sharegpt.jsonl")], "rows": "chat"}},
        {"name": "chat", "kind": "finetune", "steps": 3, "seq_len": 128, "data": {"files": [str(DATA / "chat.jsonl")], **CHAT}},
    ]
    plan = make_plan("formats", phases, port=29880, procs=RANKS)
    plan["defaults"].update(micro_batch=MICRO, seq_len=64, seed=SEED)
    out = folder / "run"
    harness("run", write_plan(folder, plan), "--out", out, check=True)
    return out


def stage_dir(out: Path, name: str) -> Path:
    return next(d for d in (out / "phases").iterdir() if d.name.endswith(name))


def test_every_row_shape_trains_and_is_evaluated(run):
    done = {m["stage"]: m for m in manifests(run)}
    assert list(done) == ["pairs", "alpaca", "sharegpt", "chat"]
    for manifest in done.values():
        assert math.isfinite(manifest["eval"]["eval/sft_loss"]) and 0 <= manifest["eval"]["eval/exact_match"] <= 1
    # 48 rows, 2 held out, 46 to train on at 8 a step: one epoch is 6 steps (the file has 300 lines)
    assert done["alpaca"]["stage_steps"] == 6 and done["alpaca"]["samples_seen"] == 48


def test_packed_stage_starts_with_the_loss_of_the_same_rows_padded(run):
    """Step 1 of the packed chat stage: every rank's micro batch of 4 rows, one sequence each; its
    train/loss is the mean of the ranks' losses, which the padded rows give on the weights the stage started from
    (measured: 6e-8 apart; with rows attending across, the same comparison on fresh weights was 6e-5 apart)."""
    request = store_request("finetune", DataSpec(files=[str(DATA / "chat.jsonl")], **CHAT), "bytes",
                            TOKEN_CACHE, "data")
    data = open_data(request, 128, SEED, byte_tokenizer().pad_token_id)
    stream = SampleStream(data)
    start = AutoModelForCausalLM.from_pretrained(stage_dir(run, "sharegpt") / "model", dtype=torch.float32).eval()
    losses = []
    for rank in range(RANKS):
        position = micro_batch_position(0, MICRO, 0, rank, RANKS)
        packed = stream.batch(position, MICRO)
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
        rows = stream.samples_at(position, MICRO)
        with torch.no_grad():
            losses.append(start(**{k: torch.from_numpy(v) for k, v in data.samples.padded(rows).items()}).loss.item())
    first = metric_rows(stage_dir(run, "chat"))[0]
    assert first["stage_step"] == 1 and first["train/loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    real_tokens = sum(min(len(data.samples.store.row(r)), 128) for r in stream.samples_at(0, 3 * MICRO * RANKS))
    assert manifests(run)[-1]["tokens_seen"] == real_tokens, "3 steps of 8 rows, no padding counted"


def test_the_template_trained_with_is_saved_with_the_model_and_renders_its_prompts(run):
    model = stage_dir(run, "chat") / "model"
    assert (model / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(model)
    request = store_request("finetune", DataSpec(files=[str(DATA / "chat.jsonl")], **CHAT), "bytes",
                            TOKEN_CACHE, "data")
    pairs = eval_pairs(open_data(request, 128, SEED, tokenizer.pad_token_id))
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    prompts = {tuple(tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, return_dict=False)) for c in conversations}
    assert all(tuple(prompt) in prompts for prompt, _ in pairs)
    assert not (stage_dir(run, "pairs") / "model" / "chat_template.jinja").exists(), "prompt/response rows use no template"
