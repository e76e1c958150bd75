"""Task metrics of greedy generation through real stages: the same weights give the same
generations at ZeRO-0, at ZeRO-3 with the weights gathered once, and at ZeRO-3 gathering per
forward; the values reach the manifest, metrics.jsonl and `harness report`.

The model has half learned the demo's cipher (trained here for a few seconds with plain torch),
so its generations differ row by row and score between 0 and the maximum. One run of three
stages on 2 CPU ranks: `sft0` evaluates at ZeRO-0 after one step; `sft3` (ZeRO-3) evaluates
the same weights before its first step (eval_on_start), then trains one step;
`sft3-forward` (ZeRO-3, generation_gather: false) evaluates those before its own step.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import finetune_phase, harness, make_plan, manifests, metric_rows, write_plan
from harness.demo import cipher_row
from harness.plan import ModelSpec
from harness.objectives.task_metrics import METRIC_NAMES, metric_keys
from harness.worker.model import build_model, byte_tokenizer

TASK = {"task_metrics": list(METRIC_NAMES), "task_rows": 5, "generation_batch": 2, "max_new_tokens": 8}
KEYS = metric_keys(list(METRIC_NAMES))


def half_trained_model(folder, rows, steps=220):
    """A tiny Llama trained on the rows with plain torch until the cipher starts to come out
    (loss about 1.5): a Hugging Face folder the plan starts from."""
    tokenizer = byte_tokenizer()
    model = build_model(ModelSpec(builtin="tiny-llama"), tokenizer, seed=1234, handoff_dir=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        encoded = [tokenizer(r["prompt"] + r["response"])["input_ids"] + [tokenizer.eos_token_id] for r in batch]
        ids = torch.tensor(encoded)  # every row has the same length (4-letter words)
        labels = ids.clone()
        labels[:, : len(tokenizer(batch[0]["prompt"])["input_ids"])] = -100
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    rng = random.Random(0)
    rows = [cipher_row(rng) for _ in range(400)]
    (root / "cipher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"files": [str(root / "cipher.jsonl")]}
    model = half_trained_model(root / "model", rows)
    phases = [
        finetune_phase("sft0", zero_stage=0, steps=1, data=data, seq_len=24, **TASK),
        finetune_phase("sft3", zero_stage=3, steps=1, eval_on_start=True, data=data, seq_len=24, **TASK),
        finetune_phase("sft3-forward", zero_stage=3, steps=1, eval_on_start=True, generation_gather=False, data=data, seq_len=24, **TASK),
    ]
    plan = write_plan(root, make_plan("generation", phases, port=29910, model={"path": str(model)}))
    out = root / "run"
    harness("run", plan, "--out", out, timeout=900, check=True)
    return out


def start_row(out, index):
    stage_dir = sorted((out / "phases").iterdir())[index]
    (row,) = [r for r in metric_rows(stage_dir) if r["stage_step"] == 0]
    return row


def test_zero3_generation_equals_zero0_on_the_same_weights(run):
    first, second, third = manifests(run)
    assert second["start_weights_digest"] == first["weights_digest"]
    assert {k: start_row(run, 1)[k] for k in KEYS} == {k: first["eval"][k] for k in KEYS}
    assert third["start_weights_digest"] == second["weights_digest"]
    assert {k: start_row(run, 2)[k] for k in KEYS} == {k: second["eval"][k] for k in KEYS}, "per-forward gathering generates the same"
    assert 0 < first["eval"]["eval/chrf"] < 100, "half-learned: the generations are partly right"


def test_every_task_metric_reaches_manifest_metrics_and_report(run):
    for manifest in manifests(run):
        values = {k: manifest["eval"][k] for k in KEYS}
        assert all(0 <= v <= 1 for k, v in values.items() if k not in ("eval/bleu", "eval/chrf")), values
        assert 0 <= values["eval/bleu"] <= 100 and 0 <= values["eval/chrf"] <= 100
    last_rows = [metric_rows(d)[-1] for d in sorted((run / "phases").iterdir())]
    assert [{k: r[k] for k in KEYS} for r in last_rows] == [{k: m["eval"][k] for k in KEYS} for m in manifests(run)]

    result = harness("report", run, check=True)
    table = json.loads((run / "report.json").read_text())
    assert [row["f1"] for row in table] == [m["eval"]["eval/f1"] for m in manifests(run)]
    assert [row["rougeL"] for row in table] == [m["eval"]["eval/rougeL"] for m in manifests(run)]
    assert [row["start_chrf"] for row in table] == [None, start_row(run, 1)["eval/chrf"], start_row(run, 2)["eval/chrf"]]
    assert "chrf" in result.stdout and "rouge1" in result.stdout and "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines() if not line.startswith("wrote ")) <= 80, "fits a pipe (80 columns)"
