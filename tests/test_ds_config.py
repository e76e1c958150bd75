"""The DeepSpeed config each stage gets: explicit, valid for DeepSpeed, right for the target world."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, REPO, finetune_phase, make_plan, pretrain_phase
from harness.launch.jobs import validate_with_deepspeed
from harness.stages.ds_config import check_ds_config, deepspeed_block_problems, get_train_ds_config
from harness.launch.setup import plan_configs
from harness.plan import BUILTIN_CONFIGS, PlanError, parse_plan
from harness.stages import expand_stages

EXAMPLE_PLANS = sorted((REPO / "plans").glob("*.yaml"))


def stages_of(phases, accelerator="cpu", local_gpus=None, **cluster):
    plan = make_plan("t", phases, port=29500)
    plan["cluster"].update(cluster)
    return expand_stages(parse_plan(plan, REPO), accelerator, count_train_rows=lambda spec: 760, model_config=BUILTIN_CONFIGS["tiny-llama"], wandb_mode="disabled",
                         local_gpus=local_gpus)


def config_of(phase, **kw):
    return get_train_ds_config(stages_of([phase], **kw)[0])


def test_batch_split_for_the_target_world_size():
    (stage,) = stages_of([pretrain_phase("p", micro_batch=4, global_batch=64)], launcher="slurm", nodes=2, procs_per_node=4)
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


# LLaMA-Factory's examples/deepspeed/ds_z3_config.json, as users paste it.
LLAMA_FACTORY_Z3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def leaves(config, path=""):
    for key, value in config.items():
        yield from leaves(value, f"{path}{key}.") if isinstance(value, dict) else [(path + key, value)]


@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
def test_auto_values_of_a_pasted_config_take_the_plans_values(accelerator):
    """As transformers' DeepSpeed integration fills them: batch, clipping and precision from the plan,
    the ZeRO buckets from the model's hidden size (64 for tiny-llama), the ZeRO stage from the file."""
    (stage,) = stages_of([pretrain_phase("p", micro_batch=2, global_batch=8, grad_clip=0.5, deepspeed=LLAMA_FACTORY_Z3)], accelerator)
    config = get_train_ds_config(stage)
    assert [key for key, value in leaves(config) if value == "auto"] == [] and deepspeed_block_problems(stage) == []
    assert stage.settings.zero_stage == 3 and config["zero_optimization"]["stage"] == 3
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (8, 2, 2)
    assert config["gradient_clipping"] == 0.5
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (accelerator == "cuda", False)
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (64 * 64, 3686, 640)
    assert zero["stage3_max_live_parameters"] == 1e9, "the file's own values are kept"
    assert config["optimizer"] == get_train_ds_config(stages_of([pretrain_phase("p", zero_stage=3)], accelerator)[0])["optimizer"]


def test_auto_optimizer_and_scheduler_params_come_from_the_plan():
    block = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}},
             "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                               "total_num_steps": "auto"}}}
    optimizer = {"type": "AdamW", "lr": 2e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-6}
    (stage,) = stages_of([pretrain_phase("p", steps=100, optimizer=optimizer, scheduler={"type": "WarmupDecayLR", "warmup_ratio": 0.1}, deepspeed=block)])
    config = get_train_ds_config(stage)
    assert deepspeed_block_problems(stage) == []
    assert {k: config["optimizer"]["params"][k] for k in ("lr", "weight_decay", "betas", "eps")} == {"lr": 2e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-6}
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-4, "warmup_num_steps": 10, "warmup_type": "linear", "total_num_steps": 100}


def test_a_deepspeed_block_cannot_change_what_the_plan_decides_or_leave_auto_unfilled():
    block = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
             "zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}, "wall_clock_breakdown": "auto", "gradient_clipping": "1.0",
             "optimizer_params_typo": {"betas": "auto"}}
    (stage,) = stages_of([pretrain_phase("p", zero_stage=2, scheduler={"type": "none"}, deepspeed=block)])
    problems = {key: allowed for key, _, allowed in deepspeed_block_problems(stage)}
    assert "set optimizer in the plan" in problems.pop("optimizer.type")
    assert "set micro_batch in the plan" in problems.pop("train_micro_batch_size_per_gpu")
    assert "(False): set precision in the plan" in problems.pop("bf16.enabled")
    assert "(2): set zero_stage in the plan" in problems.pop("zero_optimization.stage")
    assert "(none): set scheduler in the plan" in problems.pop("scheduler.type")
    assert problems.pop("gradient_clipping") == "a number, like the generated 1.0"
    assert {key: "generates nothing there" in allowed for key, allowed in problems.items()} == {"wall_clock_breakdown": True, "optimizer_params_typo.betas": True}
    assert get_train_ds_config(stage)["optimizer"]["type"] == "AdamW", "keys the plan decides keep the plan's value"


@pytest.mark.parametrize("plan", EXAMPLE_PLANS, ids=lambda p: p.stem)
def test_committed_ds_configs_match_what_the_example_plans_generate(plan: Path):
    committed_dir = REPO / "ds_configs" / plan.stem
    generated = plan_configs(plan)
    committed = {p.stem: json.loads(p.read_text()) for p in committed_dir.glob("*.json")}
    assert committed == generated, f"ds_configs/{plan.stem} drifted: run `harness configs plans/*.yaml`"


def test_multistep_is_rejected_until_its_stages_are_given():
    data = {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}}
    with pytest.raises(PlanError) as error:
        stages_of([{"name": "m", "kind": "multistep", "data": data}])
    assert [(path, allowed) for path, _, allowed in error.value.problems] == [("phases[0]", "a multistep phase needs a non-empty stages list")]
    assert len(stages_of([{"name": "m", "kind": "multistep", "data": data, "stages": [{"steps": 3}]}])) == 1


def test_a_local_launch_on_cuda_uses_at_most_the_gpus_of_this_machine():
    """The GPU count is passed in (`nvidia-smi -L` on the launching machine); the field named is
    where the number of processes comes from."""
    phases = [pretrain_phase("p"), pretrain_phase("q", procs_per_node=4)]
    with pytest.raises(PlanError) as error:
        stages_of(phases, "cuda", local_gpus=1)
    assert [(path, value) for path, value, _ in error.value.problems] == [("cluster.procs_per_node", 2), ("phases[1].procs_per_node", 4)]
    assert "at most 1, the GPUs `nvidia-smi -L` lists" in error.value.message()
    assert [s.world_size for s in stages_of(phases, "cuda", local_gpus=4)] == [2, 4]
    assert len(stages_of(phases, "cuda", local_gpus=1, launcher="slurm")) == 2, "only a local launch runs on this machine"
