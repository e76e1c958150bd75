"""Phase transitions with the real launcher: ZeRO-2 x2 -> ZeRO-2 x2 (full state) -> ZeRO-3 x2 -> ZeRO-1 x1.

The weights each stage starts from must be the weights the previous stage saved,
whatever the ZeRO stage or world size; optimizer moments travel only when the
optimizer, ZeRO family and world size stay the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from conftest import finetune_phase, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from harness.records import file_check


def digest(weights: dict[str, torch.Tensor]) -> str:
    """The manifest's weight digest, computed independently: xxh3-128 over name, shape, fp32 bytes."""
    h = xxhash.xxh3_128()
    for name in sorted(weights):
        t = weights[name].float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain")
    plan = make_plan("chain", [
        pretrain_phase("pre-a", zero_stage=2, steps=8),
        pretrain_phase("pre-b", zero_stage=2, steps=6, optimizer={"type": "AdamW", "lr": 1e-3, "betas": [0.8, 0.9]}),
        finetune_phase("sft", zero_stage=3, optimizer={"type": "SGD", "lr": 0.05, "momentum": 0.9}),
        finetune_phase("sft-1rank", zero_stage=1, procs_per_node=1, micro_batch=8, optimizer={"type": "SGD", "lr": 0.05, "momentum": 0.9}),
    ], port=29610)
    out = folder / "run"
    harness("run", write_plan(folder, plan), "--out", out, check=True)
    return out


def test_every_stage_leaves_checkpoint_model_and_manifest(chain: Path):
    stage_dirs = sorted((chain / "phases").iterdir())
    assert [d.name for d in stage_dirs] == ["00-pre-a", "01-pre-b", "02-sft", "03-sft-1rank"]
    for d in stage_dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        assert (d / "checkpoints" / manifest["checkpoint_tag"]).is_dir()
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (d / "model").iterdir()}
        for rel, check in manifest["files"].items():
            assert file_check(d / rel).model_dump() == check, f"{rel} is what the manifest recorded"
            assert check["xxh3"] == xxhash.xxh3_128((d / rel).read_bytes()).hexdigest()


def test_weights_each_stage_starts_from_equal_weights_the_previous_saved(chain: Path):
    stage_dirs = sorted((chain / "phases").iterdir())
    saved = [digest(load_file(str(d / "model" / "model.safetensors"))) for d in stage_dirs]
    records = manifests(chain)
    assert [m["weights_digest"] for m in records] == saved
    for before, after in zip(records, records[1:]):
        assert after["start_weights_digest"] == before["weights_digest"]
    assert len(set(saved)) == len(saved), "every stage trained, so every saved model differs"


def test_load_mode_follows_optimizer_zero_family_and_world_size(chain: Path):
    modes = [(m["load"]["mode"], m["load"]["reason"]) for m in manifests(chain)]
    assert modes[0][0] == "init"
    assert modes[1][0] == "full_state"
    assert modes[2][0] == "weights_only" and "optimizer changed (AdamW -> SGD)" in modes[2][1]
    assert modes[3][0] == "weights_only" and "ZeRO family changed (zero-3 -> zero-1/2)" in modes[3][1]


def test_full_state_handoff_carries_optimizer_moments(chain: Path):
    a, b, sft, _ = manifests(chain)
    assert a["optimizer_state_digest"] not in ("", "empty")
    assert b["start_optimizer_state_digest"] == a["optimizer_state_digest"]
    assert sft["start_optimizer_state_digest"] == "empty"


def test_full_state_handoff_takes_the_new_stages_hyperparameters(chain: Path):
    rows = metric_rows(chain / "phases" / "01-pre-b")
    peak = max(r["train/lr"] for r in rows)
    assert peak == pytest.approx(1e-3), "lr comes from pre-b's schedule, not from the loaded optimizer state"


def test_engine_ran_the_configured_optimizer_on_the_configured_world(chain: Path):
    records = manifests(chain)
    assert [m["engine_optimizer"] for m in records] == ["AdamW", "AdamW", "SGD", "SGD"]
    assert [(m["engine"]["zero_stage"], m["engine"]["world_size"]) for m in records] == [(2, 2), (2, 2), (3, 2), (1, 1)]
    assert len(list((chain / "phases" / "03-sft-1rank" / "ranks").glob("rank*.json"))) == 1


def test_global_step_continues_across_stages(chain: Path):
    records = manifests(chain)
    assert [(m["global_step_start"], m["global_step_end"]) for m in records] == [(0, 8), (8, 14), (14, 20), (20, 26)]
    steps = [r["global_step"] for d in sorted((chain / "phases").iterdir()) for r in metric_rows(d)]
    assert steps == list(range(1, 27))
    assert [r["global_step"] for r in metric_rows(chain)] == steps, "the run's metrics.jsonl holds every stage's lines in order"


def test_pretrain_data_position_carries_into_the_next_pretrain_stage(chain: Path):
    a, b, *_ = manifests(chain)
    (key,) = a["data_position"]
    assert a["data_position"][key] == 8 * 8  # 8 steps x global batch 8 (4 x 2 ranks)
    assert b["data_position"][key] == 8 * 8 + 6 * 8


def test_final_model_loads_with_transformers(chain: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = chain / "phases" / "03-sft-1rank" / "model"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert digest({k: v.detach() for k, v in model.state_dict().items()}) == manifests(chain)[-1]["weights_digest"]
    ids = tokenizer("Q: repeat abc\nA: ", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_status_shows_every_stage_done(chain: Path):
    result = harness("status", chain, check=True)
    for name in ("pre-a", "pre-b", "sft", "sft-1rank"):
        assert name in result.stdout
    assert result.stdout.count("done") == 4
    assert "full_state" in result.stdout and "weights_only" in result.stdout


def test_rerun_of_a_finished_run_skips_every_stage(chain: Path):
    before = {p: p.stat().st_mtime_ns for p in chain.rglob("manifest.json")}
    result = harness("run", chain / "plan.yaml", "--out", chain, check=True)
    assert result.stdout.count("done, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in chain.rglob("manifest.json")} == before
