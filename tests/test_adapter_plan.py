"""Adapters on the launch side, without ranks: what `harness plan` shows for a LoRA stage, the plan
errors of adapter settings (exit 2, nothing written), and the load-mode rule for adapters."""
from __future__ import annotations

from pathlib import Path

from conftest import FINETUNE_JSONL, REPO, cli, make_plan, write_plan
from harness.plan import ModelSpec, OffloadSpec
from harness.records import Adapter, EngineIdentity
from harness.stages import start_decision


def test_plan_shows_the_adapters_trainable_count_share_and_load_modes(tmp_path: Path):
    result = cli("plan", REPO / "plans" / "lora.yaml", "--out", tmp_path / "run", check=True)
    out = " ".join(result.stdout.split())
    # tiny-llama (hidden 64, kv 32, mlp 176, 2 layers): r=16 x (in + out) summed over 14 linear layers, plus the head's copy (259 x 64)
    lora = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 176) * 3)
    assert lora + 259 * 64 == 53_952
    assert "adapter lora r=16 alpha=32 dropout=0.05 on 14 layers, + lm_head: 53,952 of 179,584 parameters train (30.04%)" in out
    assert "stage 01 sft: load weights_only: adapter changed (none -> lora r=16" in out
    assert "stage 02 refine.c1.s1-sgd-momentum: load weights_only: adapter changed (lora r=16" in out
    assert "lr group head: 16,576 params, lr 0.001 (x0.1)" in out


def sft(trainable: dict) -> dict:
    return {"name": "sft", "kind": "finetune", "data": {"files": [str(FINETUNE_JSONL)]}, "steps": 2, "trainable": trainable}


def test_bad_adapter_settings_are_refused_naming_each_field(tmp_path: Path):
    adapter = {"type": "qlora", "targets": ["norms", "*.nothing.*", "lm_head.weight"], "modules_to_save": ["head"]}
    plan = write_plan(tmp_path, make_plan("bad", [sft({"adapter": adapter})], port=30430))
    result = cli("plan", plan, "--out", tmp_path / "run")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    err = " ".join(result.stderr.split())
    assert "phases[0].trainable.adapter.type: 'qlora' -> lora on CPU: qlora keeps the base in 4 bits with bitsandbytes, whose kernels need CUDA" in err
    assert "phases[0].trainable.adapter.targets[0]: 'norms' -> a selector of linear layers, which LoRA adapts" in err
    assert "phases[0].trainable.adapter.targets[1]: '*.nothing.*' -> a selector that matches linear layers of this model" in err
    assert "phases[0].trainable.adapter.modules_to_save[0]: 'head' -> modules that are not also in trainable.adapter.targets (lm_head is in both" in err


def test_training_base_parts_next_to_an_adapter_is_refused_naming_both_fields(tmp_path: Path):
    plan = write_plan(tmp_path, make_plan("bad", [sft({"train": ["head"], "adapter": {}})], port=30430))
    result = cli("plan", plan, "--out", tmp_path / "run")
    err = " ".join(result.stderr.split())
    assert result.returncode == 2 and "phases[0].trainable" in err
    assert "train ['head'] with adapter: with an adapter the base is frozen" in err and "adapter.modules_to_save" in err


def identity(adapter: Adapter | None) -> EngineIdentity:
    return EngineIdentity(optimizer="AdamW", zero_stage=3, world_size=2, dtype="fp32", offload=OffloadSpec(), model=ModelSpec(builtin="tiny-llama"),
                          trained="abc", layout="def", trainable_params=10, adapter=adapter)


def test_only_an_equal_adapter_carries_adapters_and_moments():
    lora = Adapter(type="lora", r=8, alpha=16, dropout=0.0, targets=["model.layers.0.mlp.up_proj"], modules_to_save=[])
    assert start_decision(identity(lora), identity(lora)).mode == "full_state"
    # the same parameter names (same trained digest), another scale: the moments belong to other adapters
    other = start_decision(identity(lora), identity(lora.model_copy(update={"alpha": 32})))
    assert other.mode == "weights_only" and other.reason.startswith("adapter changed (lora r=8 alpha=16 dropout=0 on 1 layers -> lora r=8 alpha=32")
