"""What a stage trains, resolved on the launch side: selectors across model families, lr groups
with layer decay, the plan problems of bad selectors, and the load-mode rule as a pure function."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.initialization import no_init_weights

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, REPO, cli, make_plan, pretrain_phase, write_plan
from harness.stages import start_decision
from harness.jobs.param_table import table_of as _table_of
from harness.stages.params import ParamTable
from harness.plan import BUILTIN_CONFIGS, ModelSpec, OffloadSpec, PlanError, TrainSettings, parse_plan
from harness.stages import expand_stages
from harness.records import EngineIdentity
from harness.stages.trainable import resolve, selected

FAMILIES = {
    "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, vocab_size=100),
    "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, vocab_size=100),
    "gpt2": GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0),
}


def table_of(config) -> ParamTable:
    """The table harness/jobs/param_table.py prints, built here in-process the same way (meta device)."""
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return _table_of(model)


@pytest.fixture(scope="module")
def tables() -> dict[str, ParamTable]:
    return {family: table_of(config) for family, config in FAMILIES.items()}


def names(selector: str, table: ParamTable) -> list[str]:
    return [p.name for p in selected(selector, table)]


def test_shortcuts_name_the_same_parts_in_llama_qwen2_and_gpt2(tables):
    llama, qwen2, gpt2 = tables["llama"], tables["qwen2"], tables["gpt2"]
    assert names("embeddings", llama) == names("embeddings", qwen2) == ["model.embed_tokens.weight"]
    assert names("embeddings", gpt2) == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names("head", llama) == ["lm_head.weight"]
    assert names("head", gpt2) == ["transformer.wte.weight"], "GPT-2's head is tied to the token embeddings: one matrix"
    assert names("norms", llama)[-1] == "model.norm.weight" and len(names("norms", llama)) == 3 * 2 + 1
    assert names("norms", gpt2)[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"] and len(names("norms", gpt2)) == 3 * 4 + 2
    for table, prefix in ((llama, "model.layers."), (qwen2, "model.layers."), (gpt2, "transformer.h.")):
        layer_of = lambda selector: sorted({int(n.removeprefix(prefix).split(".")[0]) for n in names(selector, table)})
        assert layer_of("layers[:1]") == [0] and layer_of("layers[-2:]") == [1, 2] and layer_of("layers[1:3]") == [1, 2]
        assert layer_of("layers[2]") == layer_of("layers[-1]") == [2]
        assert names("layers[3]", table) == [] and names("layers[5:]", table) == []
    assert names("re:.*\\.mlp\\..*_proj\\.weight", llama)[:3] == [f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert names("*.self_attn.q_proj.*", qwen2) == [f"model.layers.{i}.self_attn.q_proj.{k}" for i in range(3) for k in ("weight", "bias")]


def settings(**trainable) -> TrainSettings:
    return TrainSettings(optimizer={"type": "AdamW", "lr": 1e-3}, trainable=trainable)


def test_layer_decay_times_lr_scale_gives_each_group_its_multiplier(tables):
    chosen, problems = resolve(settings(train=["all"], freeze=["norms"], layer_decay=0.5, lr_scale={"head": 2.0}), tables["llama"])
    assert problems == []
    # L = 3: decoder layer k (1-based) at 0.5^(3-k); embeddings (k = 0) at 0.5^3; the head at 1 x its lr_scale 2.
    assert [(g.label, g.lr_scale) for g in chosen.groups] == [("embeddings", 0.125), ("layer 0", 0.25), ("layer 1", 0.5), ("layer 2", 1.0), ("head", 2.0)]
    assert [g.lr for g in chosen.groups] == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3])
    assert set(chosen.frozen) == set(names("norms", tables["llama"]))
    table = tables["llama"]
    assert chosen.trainable_params == sum(p.numel for p in table.params if "norm" not in p.roles)
    assert chosen.total_params == sum(p.numel for p in table.params)


def test_weight_decay_from_the_regularization_skips_1d_parameters_unless_include_1d(tables):
    reg = {"l2": 0.1, "l2_mode": "weight_decay"}
    chosen, _ = resolve(TrainSettings(regularization=reg, trainable={"train": ["layers[0]"]}), tables["qwen2"])
    assert [(g.label, g.decay) for g in chosen.groups] == [("layer 0", True), ("layer 0 (no weight decay)", False)]
    assert all(n.endswith("bias") or "norm" in n for n in chosen.groups[1].names)
    together, _ = resolve(TrainSettings(regularization={**reg, "include_1d": True}, trainable={"train": ["layers[0]"]}), tables["qwen2"])
    assert [g.decay for g in together.groups] == [True]


def test_layout_is_all_for_every_parameter_in_one_group_and_a_digest_otherwise(tables):
    everything, _ = resolve(settings(lr_scale={"all": 0.5}), tables["llama"])
    assert everything.layout() == "all"
    upper, _ = resolve(settings(train=["head", "layers[-1:]"]), tables["llama"])
    same, _ = resolve(settings(train=["layers[2]", "lm_head.weight"], lr_scale={"head": 3.0}), tables["llama"])
    assert upper.layout() != "all"
    assert upper.layout() != same.layout(), "same parameters, but the head in a group of its own"
    again, _ = resolve(settings(train=["layers[2]", "lm_head.weight"], lr_scale={"head": 0.1}), tables["llama"])
    assert again.layout() == same.layout(), "other lrs, same groups"


@pytest.mark.parametrize("trainable, field, says", [
    ({"train": ["head", "*.attention.*"]}, "trainable.train[1]", "matches parameters of this model"),
    ({"train": ["layers[3:]"]}, "trainable.train[0]", "matches parameters of this model"),
    ({"train": ["head"], "freeze": ["head"]}, "trainable", "at least one trained parameter"),
    ({"train": ["layers[0]"], "lr_scale": {"embeddings": 0.1}}, "trainable.lr_scale.embeddings", "matches only frozen ones"),
    ({"lr_scale": {"layers[0]": 0.1, "*.mlp.*": 0.5}}, "trainable.lr_scale.*.mlp.*", "model.layers.0.mlp.gate_proj.weight is in 'layers[0]' too"),
])
def test_selector_problems_name_the_field_and_real_names(tables, trainable, field, says):
    chosen, problems = resolve(settings(**trainable), tables["llama"])
    assert chosen is None
    assert [p[0] for p in problems] == [field]
    assert says in problems[0][2]
    if "matches parameters" in says:  # the hint lists real names, each layer's index as *
        assert "model.embed_tokens.weight, model.layers.*.self_attn.q_proj.weight" in problems[0][2]


# ---- the load-mode rule -------------------------------------------------------------------

def side(**changes) -> EngineIdentity:
    base = dict(optimizer="AdamW", zero_stage=2, world_size=2, dtype="fp32", offload=OffloadSpec(), model=ModelSpec(builtin="tiny-llama"),
                trained="all", layout="all", trainable_params=None)
    return EngineIdentity(**{**base, **changes})


def test_first_stage_starts_from_the_plan():
    assert start_decision(None, side()).mode == "init"


def test_moments_carry_when_nothing_they_depend_on_changed():
    decision = start_decision(side(zero_stage=1), side(zero_stage=2))
    assert decision.mode == "full_state" and "trainable set" in decision.reason
    assert decision.previous == side(zero_stage=1), "the worker checks the previous manifest against this"
    partial = side(trained="9c01", layout="3f2a", trainable_params=1000)
    assert start_decision(partial, partial).mode == "full_state"


@pytest.mark.parametrize("before, now, reason", [
    (side(), side(optimizer="SGD"), "optimizer changed (AdamW -> SGD)"),
    (side(), side(zero_stage=3), "ZeRO family changed (zero-1/2 -> zero-3)"),
    (side(), side(world_size=1), "world size changed (2 -> 1)"),
    (side(), side(dtype="bf16"), "precision changed (fp32 -> bf16)"),
    (side(), side(offload=OffloadSpec(optimizer=True)), "offload changed"),
    (side(), side(trained="9c01", layout="3f2a", trainable_params=1000), "trainable set changed (all -> 1,000 parameters"),
    (side(trained="9c01", layout="3f2a", trainable_params=1000), side(trained="5e7d", layout="77b1", trainable_params=2000),
     "trainable set changed (1,000 -> 2,000 parameters"),
    # Other parameters of the same size (tied-size embeddings and head, say) are another set all the same.
    (side(trained="9c01", layout="3f2a", trainable_params=1000), side(trained="5e7d", layout="77b1", trainable_params=1000),
     "trainable set changed (1,000 -> 1,000 parameters"),
    (side(trained="9c01", layout="3f2a", trainable_params=1000), side(trained="9c01", layout="77b1", trainable_params=1000),
     "trainable groups changed (the same parameters (1,000) in other lr groups"),
    (side(), side(layout="77b1"), "trainable groups changed (the same parameters (all) in other lr groups"),
])
def test_anything_else_starts_from_the_weights_with_the_reason(before, now, reason):
    decision = start_decision(before, now)
    assert decision.mode == "weights_only"
    assert reason in decision.reason


# ---- bad selectors on the command line: exit 2, nothing written ---------------------------

@pytest.mark.parametrize("trainable, says", [
    ({"train": ["*.attention.*"]}, "phases[0].trainable.train[0]: '*.attention.*' -> a selector that matches parameters of this model"),
    ({"train": ["layers[2:]"]}, "phases[0].trainable.train[0]: 'layers[2:]' -> a selector that matches parameters of this model (2 decoder layers"),
    ({"train": ["norms"], "freeze": ["re:.*norm.*"]}, "phases[0].trainable: "),
    ({"train": ["layers[x]"]}, "phases[0].trainable.train[0]: 'layers[x]' -> a layer range like layers[:2]"),
], ids=["glob", "layer-range", "nothing-trains", "syntax"])
def test_bad_selectors_exit_2_before_anything_is_written(tmp_path, trainable, says):
    plan = write_plan(tmp_path, make_plan("bad", [pretrain_phase("p", trainable=trainable)], port=29500))
    out = tmp_path / "run"
    result = cli("plan", plan, "--out", out)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert not out.exists()


# ---- stages: the trainable set travels with the stage -------------------------------------

def tiny_llama_table(adapter=None) -> ParamTable:
    from harness.plan import ModelSpec
    from harness.worker.model import architecture, byte_tokenizer

    return table_of(architecture(ModelSpec(builtin="tiny-llama"), byte_tokenizer()))


def multistep(*stages: dict) -> dict:
    data = {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}}
    return {"name": "ms", "kind": "multistep", "data": data, "stages": list(stages)}


def test_a_multistep_stage_names_its_own_selector_field():
    plan = parse_plan(make_plan("t", [multistep({"steps": 2}, {"steps": 2, "trainable": {"train": ["head", "*.attention.*"]}})], port=29500), REPO)
    with pytest.raises(PlanError) as error:
        expand_stages(plan, "cpu", lambda spec: 760, BUILTIN_CONFIGS["tiny-llama"], model_params=tiny_llama_table, wandb_mode="disabled")
    assert [p[0] for p in error.value.problems] == ["phases[0].stages[1].trainable.train[1]"]


def test_wandb_config_holds_the_trainable_set_and_each_groups_lr():
    from harness.worker.monitor import run_config

    stage = {"steps": 2, "optimizer": {"type": "AdamW", "lr": 1e-3}, "trainable": {"train": ["head", "layers[-1:]"], "lr_scale": {"head": 0.1}}}
    plan = parse_plan(make_plan("t", [multistep({"steps": 2}, stage)], port=29500), REPO)
    untouched, chosen = expand_stages(plan, "cpu", lambda spec: 760, BUILTIN_CONFIGS["tiny-llama"], model_params=tiny_llama_table, wandb_mode="disabled")
    assert untouched.trainable is None, "a stage with the default trains everything, resolved without the model"
    config = run_config(chosen, {})["trainable"]
    assert config["spec"]["train"] == ["head", "layers[-1:]"]
    assert [(g["label"], g["lr"]) for g in config["groups"]] == [("layer 1", 1e-3), ("head", pytest.approx(1e-4))]
    assert config["trainable_params"] == sum(g["params"] for g in config["groups"]) and "lm_head.weight" in config["groups"][1]["names"]


def test_plan_shows_what_each_stage_trains_its_lr_groups_and_load_mode(tmp_path):
    result = cli("plan", REPO / "plans" / "parts.yaml", "--out", tmp_path / "run", check=True)
    rows = {line.split("│")[2].strip(): [cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.startswith("│")}
    skip_memory = [10, 11, 12, 14]  # column 13: the memory estimate against this machine's
    assert [rows["refine.c1.s1-upper-sgd"][k] for k in skip_memory] == ["sdpa", "62,976 (50.1%)", "1: 0.1", "weights_only"]
    assert [rows["refine.c1.s3-all-adamw"][k] for k in skip_memory] == ["sdpa", "125,632 (100.0%)", "3: 0.00064..0.002", "weights_only"]
    assert "stage 02 refine.c1.s2-lower-momentum: load weights_only: trainable set changed (62,976 -> 62,784 parameters" in result.stdout
    assert "  lr group embeddings: 16,576 params, lr 0.00064 (x0.32)" in result.stdout
