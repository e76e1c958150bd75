"""The DeepSpeed config each stage gets: explicit, valid for DeepSpeed, right for the target world."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, finetune_phase, make_plan, pretrain_phase
from harness.ds_config import check_ds_config, get_train_ds_config, validate_with_deepspeed
from harness.setup import plan_configs
from harness.plan import BUILTIN_CONFIGS, PlanError, parse_plan
from harness.stages import expand_stages

EXAMPLE_PLANS = sorted((REPO / "plans").glob("*.yaml"))


def stages_of(phases, accelerator="cpu", **cluster):
    plan = make_plan("t", phases, port=29500)
    plan["cluster"].update(cluster)
    return expand_stages(parse_plan(plan, REPO), accelerator, count_train_rows=lambda spec: 760, model_config=BUILTIN_CONFIGS["tiny-llama"])


def config_of(phase, **kw):
    return get_train_ds_config(stages_of([phase], **kw)[0])


def test_batch_split_for_the_target_world_size():
    (stage,) = stages_of([pretrain_phase("p", micro_batch=4, global_batch=64)], nodes=2, procs_per_node=4)
    config = get_train_ds_config(stage)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (64, 4, 2)
    assert check_ds_config(config, world_size=8) == []
    assert check_ds_config(config, world_size=4), "the same config is wrong for another world size"


def test_global_batch_defaults_to_micro_times_world():
    config = config_of(pretrain_phase("p", micro_batch=3), procs_per_node=2)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (6, 1)


def test_sgd_is_spelled_for_torch_and_allowed_under_zero():
    config = config_of(pretrain_phase("p", zero_stage=2, optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}))
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "nesterov": True}}
    assert config["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in config_of(pretrain_phase("p", zero_stage=0, optimizer={"type": "SGD", "lr": 0.1}))


def test_adam_flavours_are_explicit_and_avoid_the_jit_on_cpu():
    adamw = config_of(pretrain_phase("p", optimizer={"type": "adamw", "lr": 1e-3}))["optimizer"]
    adam = config_of(pretrain_phase("p", optimizer={"type": "Adam", "lr": 1e-3}))["optimizer"]
    assert adamw["type"] == "AdamW" and adamw["params"]["adam_w_mode"] is True and adamw["params"]["torch_adam"] is True
    assert adam["params"]["adam_w_mode"] is False, "DeepSpeed's Adam silently becomes AdamW otherwise"
    gpu = config_of(pretrain_phase("p", optimizer={"type": "AdamW", "lr": 1e-3}), accelerator="cuda")["optimizer"]
    assert "torch_adam" not in gpu["params"], "FusedAdam on GPU"
    offload = config_of(pretrain_phase("p", offload={"optimizer": True}))
    assert "torch_adam" not in offload["optimizer"]["params"] and offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_scheduler_length_comes_from_the_stage():
    config = config_of(pretrain_phase("p", steps=200, scheduler={"type": "WarmupCosineLR", "warmup_ratio": 0.1, "min_lr_ratio": 0.05}))
    assert config["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 200, "warmup_num_steps": 20, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.05, "warmup_type": "linear"}}
    tokens = config_of(pretrain_phase("p", steps=None, tokens=64 * 8 * 50 + 1, scheduler={"type": "WarmupDecayLR"}))
    assert tokens["scheduler"]["params"]["total_num_steps"] == 51
    epochs = config_of(finetune_phase("f", steps=None, epochs=2, scheduler={"type": "OneCycle"}))
    assert epochs["scheduler"]["params"]["cycle_first_step_size"] + epochs["scheduler"]["params"]["cycle_second_step_size"] == 190  # 2 x 760 / 8
    assert "scheduler" not in config_of(pretrain_phase("p", scheduler={"type": "none"}))


def test_precision_defaults_by_device_and_clipping_is_explicit():
    cpu, gpu = config_of(pretrain_phase("p")), config_of(pretrain_phase("p"), accelerator="cuda")
    assert (cpu["bf16"]["enabled"], gpu["bf16"]["enabled"]) == (False, True)
    assert not cpu["fp16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert config_of(pretrain_phase("p", grad_clip=0.0))["gradient_clipping"] == 0.0


def test_users_deepspeed_block_is_merged_last():
    config = config_of(pretrain_phase("p", zero_stage=3, deepspeed={"zero_optimization": {"stage3_max_live_parameters": 1000}, "wall_clock_breakdown": True}))
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert config["wall_clock_breakdown"] is True


def test_deepspeed_itself_accepts_every_generated_config_and_we_catch_what_it_ignores():
    good = [config_of(pretrain_phase("p", zero_stage=z, optimizer=o)) for z in (0, 1, 2, 3) for o in ({"type": "SGD", "lr": 0.1}, {"type": "AdamW", "lr": 1e-3})]
    bad_top = {**good[0], "zero_optimisation": {"stage": 2}}
    bad_block = {**good[0], "zero_optimization": {"stage": 2, "overlap_com": True}}
    problems = validate_with_deepspeed([*good, bad_top, bad_block])
    assert len(problems) == 2, problems
    assert problems[0] == (len(good), "unknown top-level DeepSpeed key 'zero_optimisation' (DeepSpeed would ignore it)")
    assert problems[1][0] == len(good) + 1 and problems[1][1].startswith("DeepSpeed rejects the config") and "overlap_com" in problems[1][1]


def test_no_auto_values_are_left():
    assert check_ds_config({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                            "zero_optimization": {"reduce_bucket_size": "auto"}}, 2) == ["zero_optimization.reduce_bucket_size is 'auto'; every value must be explicit"]


@pytest.mark.parametrize("plan", EXAMPLE_PLANS, ids=lambda p: p.stem)
def test_committed_ds_configs_match_what_the_example_plans_generate(plan: Path):
    committed_dir = REPO / "ds_configs" / plan.stem
    generated = plan_configs(plan)
    committed = {p.stem: json.loads(p.read_text()) for p in committed_dir.glob("*.json")}
    assert committed == generated, f"ds_configs/{plan.stem} drifted: run `harness configs plans/*.yaml`"


def test_the_launch_side_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, harness.cli, harness.orchestrator, harness.setup, harness.hosts, harness.processes, harness.failures, harness.status, harness.slurm, harness.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_multistep_is_rejected_until_its_stages_are_given():
    with pytest.raises(PlanError, match="multistep phase needs"):
        stages_of([{"name": "m", "kind": "multistep", "data": {"files": ["x"]}, "steps": 3}])
