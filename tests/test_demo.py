"""The embedded default, as a user runs it: `harness demo` on CPU, offline."""
from __future__ import annotations

import json

from conftest import harness, metric_rows


def test_demo_trains_every_phase_kind_and_says_where_the_model_is(tmp_path):
    out = tmp_path / "demo"
    result = harness("demo", "--out", out, check=True)
    stage_dirs = sorted((out / "phases").iterdir())
    names = [d.name.split("-", 1)[1] for d in stage_dirs]
    assert names[:3] == ["pretrain", "finetune", "prefer"] and all(n.startswith("refine.c") for n in names[3:]) and len(names) == 9
    records = [json.loads((d / "manifest.json").read_text()) for d in stage_dirs]
    assert [(m["kind"], m["engine"]["zero_stage"], m["engine"]["world_size"]) for m in records[:3]] == [
        ("pretrain", 2, 2), ("finetune", 3, 2), ("preference", 3, 2)]
    assert {m["engine_optimizer"] for m in records[3:]} == {"SGD", "AdamW"}
    assert records[0]["eval"]["eval/loss"] < 4.0, "pretraining learned something: a byte model starts near ln(259) = 5.6"
    (before,) = [row for row in metric_rows(stage_dirs[1]) if row["stage_step"] == 0]
    assert before["eval/exact_match"] <= 0.1 and records[1]["eval"]["eval/exact_match"] >= 0.5, "the fine-tune phase taught the cipher"
    (start,) = [row for row in metric_rows(stage_dirs[2]) if row["stage_step"] == 0]
    preferred = records[2]["eval"]
    assert start["eval/rewards/accuracies"] == 0 and preferred["eval/rewards/accuracies"] >= 0.9, "DPO learned to prefer the right shift"
    assert preferred["eval/exact_match"] >= records[1]["eval"]["eval/exact_match"], "and still answers as well as after fine-tuning"
    assert records[2]["reference"]["pairs"] == 400 and records[2]["start_weights_digest"] == records[1]["weights_digest"]
    report = harness("report", out, check=True)
    assert "start" in report.stdout and "exact" in report.stdout, "the report shows exact match before and after fine-tuning"
    assert "rewards/accuracies" in report.stdout and "rewards/margins" in report.stdout

    final = stage_dirs[-1] / "model"
    assert f"AutoModelForCausalLM.from_pretrained('{final}')" in result.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"
    rerun = harness("demo", "--out", out, check=True)
    assert rerun.stdout.count("done, skipped") == 9
