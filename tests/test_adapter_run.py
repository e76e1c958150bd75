"""LoRA stages for real, through the `harness run` command line (one run on 2 CPU ranks, read by
every test; a second, short one on 1 rank for the other ZeRO stages):

  00 pre           ZeRO-3  full pretraining
  01 sft           ZeRO-3  LoRA r=8 on every linear layer, the head trained fully (modules_to_save) at lr x 0.1
  02 sft-more      ZeRO-3  the same adapter -> full_state: adapters and their moments carried
  03/04 refine     ZeRO-3  a full multistep phase (SGD, then AdamW) from the merged model

What a user relies on: the optimizer holds state for the adapter only, the base comes out
bit-identical, the handoff is the merged model (W + (alpha/r) B A, computed here from the adapter
file) plus an adapter folder peft loads to the same logits, and the reference pass with the
adapters disabled is the incoming model.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, FINETUNE_JSONL, PRETRAIN_TEXT, harness, make_plan, manifests, write_plan
from test_handoff import digest
from wandb_records import offline_runs

R, ALPHA = 8, 16.0
ADAPTER = {"r": R, "alpha": ALPHA, "dropout": 0.05, "targets": ["all-linear"], "modules_to_save": ["head"]}
STAGES = ["00-pre", "01-sft", "02-sft-more", "03-refine.c1.s1-sgd", "04-refine.c1.s2-adamw"]


def phases() -> list[dict]:
    sft = {"kind": "finetune", "data": {"files": [str(FINETUNE_JSONL)]}, "seq_len": 48, "zero_stage": 3,
           "trainable": {"adapter": ADAPTER, "lr_scale": {"head": 0.1}}}
    refine = {"name": "refine", "kind": "multistep", "zero_stage": 3,
              "data": {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}},
              "stages": [{"optimizer": {"type": "SGD", "lr": 0.05}, "steps": 1}, {"steps": 1, "data": "finetune"}]}
    return [
        {"name": "pre", "kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, "steps": 3, "zero_stage": 3},
        {"name": "sft", "steps": 4, "checkpoint_every": 2, **sft},
        {"name": "sft-more", "steps": 2, **sft},
        refine,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    out = folder / "run"
    plan = make_plan("lora", phases(), port=30400, wandb={"mode": "offline", "project": "harness-test"})
    harness("run", write_plan(folder, plan), "--out", out, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return out


def weights(run: Path, stage: str, folder: str = "model") -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if folder == "adapter" else "model.safetensors"
    return load_file(str(run / "phases" / stage / folder / name))


def frozen_names(run: Path, stage: str) -> list[str]:
    return json.loads((run / "phases" / stage / "stage.json").read_text())["stage"]["trainable"]["frozen"]


def base_name(adapted: str) -> str:
    """The base model's name of a frozen parameter of peft's wrapper, as this test reads peft's naming."""
    return re.sub(r"\.(base_layer|original_module)\.", ".", adapted.removeprefix("base_model.model."))


def test_lora_between_full_phases_carries_or_merges_by_the_load_mode_rule(run: Path):
    records = manifests(run)
    assert [m["stage"] for m in records] == [s[3:] for s in STAGES]
    assert [m["load"]["mode"] for m in records] == ["init", "weights_only", "full_state", "weights_only", "weights_only"]
    assert records[1]["load"]["reason"].startswith("adapter changed (none -> lora r=8 alpha=16 dropout=0.05 on 14 layers, + lm_head")
    assert "adapters, optimizer moments carried" in records[2]["load"]["reason"]
    assert records[3]["load"]["reason"].startswith("adapter changed (lora r=8")
    for before, after in zip(records, records[1:]):  # every start, adapters included, checked against the handoff it loads
        assert after["start_weights_digest"] == before["weights_digest"], after["stage"]
    # AdamW counts its steps in its state: sft-more's moments went on from sft's 4 steps.
    steps = {int(s["step"]) for rank in optimizer_states(run, "02-sft-more", "step2") for s in rank["state"].values()}
    assert steps == {4 + 2}
    assert [m["trainable"]["adapter"]["r"] if m["trainable"]["adapter"] else None for m in records] == [None, R, R, None, None]


def optimizer_states(run: Path, stage: str, tag: str) -> list[dict]:
    files = sorted((run / "phases" / stage / "checkpoints" / tag).glob("zero_pp_rank_*_optim_states.pt"))
    assert len(files) == 2
    return [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"] for f in files]


def test_optimizer_state_exists_for_the_adapter_only(run: Path):
    adapter_file = weights(run, "01-sft", "adapter")
    trained = manifests(run)[1]["trainable"]["trainable_params"]
    assert trained == sum(t.numel() for t in adapter_file.values()), "the LoRA matrices and the head's trained copy"
    assert trained < 0.3 * manifests(run)[0]["trainable"]["total_params"]
    for key in ("exp_avg", "exp_avg_sq"):
        held = sum(s[key].numel() for rank in optimizer_states(run, "01-sft", "step2") for s in rank["state"].values())
        assert held == trained, f"{key}: one value per adapter element, across the 2 ZeRO-3 partitions"


def test_the_frozen_base_comes_out_bit_identical(run: Path):
    incoming = weights(run, "00-pre")
    for stage in ("01-sft", "02-sft-more"):
        record = manifests(run)[STAGES.index(stage)]["trainable"]
        frozen = frozen_names(run, stage)
        assert sorted(map(base_name, frozen)) == sorted(incoming), "every base tensor (the head: the original under its trained copy)"
        # gathered from the ZeRO-3 engine at the start and the end of the stage: the incoming model's tensors, bit for bit
        assert record["frozen_digest_start"] == record["frozen_digest_end"] == digest({n: incoming[base_name(n)] for n in frozen})


def assert_merged_is_base_plus_scaled_b_times_a(run: Path, stage: str, base_stage: str, scale: float) -> set[str]:
    """The stage's handoff against W + scale·B·A, computed here from its adapter file and the base's
    handoff; returns the names of the adapted weights."""
    base, merged, adapter = weights(run, base_stage), weights(run, stage), weights(run, stage, "adapter")
    assert set(merged) == set(base)
    targets = {k.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight": k for k in adapter if ".lora_A." in k}
    assert targets, "the adapter file holds LoRA matrices"
    for name, a_key in targets.items():
        a, b = adapter[a_key].double(), adapter[a_key.replace(".lora_A.", ".lora_B.")].double()
        expected = base[name].double() + scale * (b @ a)
        assert torch.allclose(merged[name].double(), expected, rtol=0, atol=1e-6), name
        assert not torch.equal(merged[name], base[name]), f"{name}: the adapter trained"
    return set(targets)


def test_merged_weights_are_the_base_plus_scaled_b_times_a_from_the_adapter_file(run: Path):
    base = weights(run, "00-pre")
    for stage in ("01-sft", "02-sft-more"):  # both adapt the same base: sft-more carried sft's adapters on
        merged, adapter = weights(run, stage), weights(run, stage, "adapter")
        targets = assert_merged_is_base_plus_scaled_b_times_a(run, stage, "00-pre", ALPHA / R)
        assert len(targets) == 14, "all-linear: 7 projections in each of 2 layers, not the head"
        assert torch.equal(merged["lm_head.weight"], adapter["base_model.model.lm_head.weight"]), "the head: its trained copy"
        untouched = set(base) - set(targets) - {"lm_head.weight"}
        assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched), "embeddings and norms as they came"


def fixed_batch() -> torch.Tensor:
    return torch.tensor([[5 + (11 * i + 5 * j) % 240 for j in range(20)] for i in range(3)])


def test_the_adapter_folder_loads_in_peft_with_the_merged_models_logits(run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for stage in ("01-sft", "02-sft-more"):
        folder = run / "phases" / stage / "adapter"
        base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base_path) == run / "phases" / "00-pre" / "model", "the model the adapter applies to"
        with torch.no_grad():
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder).eval()
            merged = AutoModelForCausalLM.from_pretrained(run / "phases" / stage / "model").eval()
            base = AutoModelForCausalLM.from_pretrained(base_path).eval()
            ids = fixed_batch()
            adapted, expected = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
            assert torch.allclose(adapted, expected, rtol=0, atol=1e-5)
            assert (adapted - base(input_ids=ids).logits).abs().max() > 1e-2, "the adapter changes the logits"


def test_reference_log_probs_with_adapters_disabled_equal_the_incoming_handoffs(run: Path, tmp_path: Path):
    """The rank-side piece a dpo/ipo objective calls for its reference (DeepSpeedStrategy.adapters_disabled),
    on sft-more's ZeRO-3 engine rebuilt on 2 ranks, against the incoming handoff loaded by transformers."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from adapter_reference import token_log_probs

    out = tmp_path / "log_probs.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "30420",
                             str(REPO / "tests" / "adapter_reference.py"), str(run / "phases" / "02-sft-more"), str(out)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = torch.load(out)
    with torch.no_grad():
        incoming = AutoModelForCausalLM.from_pretrained(run / "phases" / "00-pre" / "model").eval()
        merged = AutoModelForCausalLM.from_pretrained(run / "phases" / "02-sft-more" / "model").eval()
        ids = found["batch"]
        assert torch.allclose(found["adapters_disabled"], token_log_probs(incoming(input_ids=ids).logits, ids), rtol=0, atol=1e-5)
        assert torch.allclose(found["adapters_on"], token_log_probs(merged(input_ids=ids).logits, ids), rtol=0, atol=1e-5)
    assert (found["adapters_on"] - found["adapters_disabled"]).abs().max() > 1e-2, "disabling changed what the forward computes"


def test_wandb_records_the_adapter_stage(run: Path):
    runs = offline_runs(run / "wandb")
    assert len(runs) == len(STAGES) and runs[1].config["trainable"]["spec"]["adapter"]["r"] == R
    assert any("train/loss" in row for row in runs[1].history)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """1 rank, the other ZeRO stages: an adapter on the plan's model at ZeRO-0, then at ZeRO-1 and
    ZeRO-2 (one ZeRO family: moments carried)."""
    folder = tmp_path_factory.mktemp("adapter-1rank")
    out = folder / "run"
    lora = {"kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, "steps": 2,
            "trainable": {"adapter": {"r": 4, "targets": ["layers[-1:]"], "modules_to_save": []}}}
    plan = make_plan("lora1", [{"name": "z0", "zero_stage": 0, **lora}, {"name": "z1", "zero_stage": 1, **lora},
                               {"name": "z2", "zero_stage": 2, **lora}], port=30410, procs=1)
    harness("run", write_plan(folder, plan), "--out", out, check=True)
    return out


def test_adapters_at_zero_0_1_2_on_one_rank(one_rank: Path):
    records = manifests(one_rank)
    assert [m["load"]["mode"] for m in records] == ["init", "weights_only", "full_state"]
    assert records[1]["load"]["reason"].startswith("ZeRO family changed (zero-0 -> zero-1/2)")
    for before, after in zip(records, records[1:]):
        assert after["start_weights_digest"] == before["weights_digest"]
    for m in records:
        assert m["trainable"]["frozen_digest_start"] == m["trainable"]["frozen_digest_end"] != "none"
    adapter = weights(one_rank, "02-z2", "adapter")
    assert records[2]["trainable"]["trainable_params"] == sum(t.numel() for t in adapter.values())
    assert all(".layers.1." in k for k in adapter), "layers[-1:]: the last layer's linear layers only"


def test_a_zero_2_adapter_checkpoint_consolidates_to_the_stages_merged_handoff(one_rank: Path, tmp_path: Path):
    """What a resume at another ZeRO stage starts from (harness/jobs/reshard.py): the tag's base and
    adapter merged, read from a ZeRO-2 checkpoint whose frozen base sits in its model states."""
    from harness.jobs.reshard import consolidate
    from harness.plan import ModelSpec
    from harness.records import Adapter

    stage = json.loads((one_rank / "phases" / "02-z2" / "stage.json").read_text())["stage"]
    (tag,) = [p for p in (one_rank / "phases" / "02-z2" / "checkpoints").glob("step*") if p.is_dir()]
    consolidate(tag, tmp_path, ModelSpec.model_validate(stage["model"]), Adapter.model_validate(stage["trainable"]["adapter"]))
    merged, handoff = load_file(str(tmp_path / "model.safetensors")), weights(one_rank, "02-z2")
    assert set(merged) == set(handoff)
    assert all(torch.allclose(merged[n], handoff[n], rtol=0, atol=1e-6) for n in handoff)
