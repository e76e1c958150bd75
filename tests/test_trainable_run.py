"""Stages that train different parts of the model, for real (one run, 2 CPU ranks, read by every test):

  00 upper        ZeRO-3 AdamW   head + layer 0, layer decay 0.5, head x2, L1/L2 penalties, 4 steps
  01 upper-again  ZeRO-3 AdamW   the same parameters in the same groups (other lrs) -> full_state
  02 lower        ZeRO-3 AdamW   embeddings + layer 1: the trainable set changed -> weights_only
  03 zero0        ZeRO-0 SGD     norms + head
  04 offload      ZeRO-2 AdamW, optimizer offloaded to CPU: the MLPs of layer 1

Frozen tensors must come out bit-identical (in the saved Hugging Face folder and, gathered from the
engine, in the manifest's digests), the optimizer must hold state for trained parameters only, and
each group must train at the scheduled lr x its multiplier.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import harness, make_plan, manifests, pretrain_phase, write_plan
from test_handoff import digest

L1, L2 = 1e-4, 1e-2
SCHEDULE = {"type": "WarmupCosineLR", "warmup_ratio": 0.0, "min_lr_ratio": 0.1}
STAGES = ["00-upper", "01-upper-again", "02-lower", "03-zero0", "04-offload"]


def phases() -> list[dict]:
    adamw = {"type": "AdamW", "lr": 1e-3}
    return [
        pretrain_phase("upper", steps=4, zero_stage=3, optimizer=adamw, scheduler=SCHEDULE, checkpoint_every=2, keep_checkpoints=2,
                       regularization={"l1": L1, "l2": L2}, trainable={"train": ["head", "layers[0]"], "layer_decay": 0.5, "lr_scale": {"head": 2.0}}),
        pretrain_phase("upper-again", steps=2, zero_stage=3, optimizer=adamw,
                       trainable={"train": ["layers[:1]", "lm_head.weight"], "layer_decay": 0.25, "lr_scale": {"head": 0.5}}),
        pretrain_phase("lower", steps=2, zero_stage=3, optimizer=adamw, trainable={"train": ["embeddings", "layers[1]"]}),
        pretrain_phase("zero0", steps=2, zero_stage=0, optimizer={"type": "SGD", "lr": 0.05, "momentum": 0.9}, trainable={"train": ["norms", "head"]}),
        pretrain_phase("offload", steps=2, zero_stage=2, offload={"optimizer": True}, optimizer=adamw,
                       trainable={"train": ["re:.*\\.mlp\\..*"], "freeze": ["layers[0]"]}),
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trainable")
    out = folder / "run"
    harness("run", write_plan(folder, make_plan("parts", phases(), port=29720)), "--out", out, check=True)
    return out


def stage_file(run: Path, stage: str) -> dict:
    return json.loads((run / "phases" / stage / "stage.json").read_text())


def frozen_names(run: Path, stage: str) -> list[str]:
    return stage_file(run, stage)["stage"]["trainable"]["frozen"]


def saved(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "phases" / stage / "model" / "model.safetensors"))


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()


def test_frozen_tensors_come_out_bit_identical_and_trained_ones_change(run: Path):
    for before, stage in zip(STAGES, STAGES[1:]):
        old, new, frozen = saved(run, before), saved(run, stage), set(frozen_names(run, stage))
        assert frozen and set(old) == set(new)
        unchanged = {name for name in new if tensor_digest(new[name]) == tensor_digest(old[name])}
        assert unchanged == frozen, f"{stage}: exactly its frozen tensors are unchanged"


def test_frozen_digest_gathered_from_the_zero3_engine_is_unchanged_and_equals_the_files(run: Path):
    records = manifests(run)
    for k, stage in enumerate(STAGES):
        trainable = records[k]["trainable"]
        assert trainable["frozen_digest_start"] == trainable["frozen_digest_end"] != "none"
    for k in (1, 2):  # ZeRO-3 stages on 2 ranks: the frozen partitions gathered from the engine
        previous = saved(run, STAGES[k - 1])
        assert records[k]["trainable"]["frozen_digest_start"] == digest({name: previous[name] for name in frozen_names(run, STAGES[k])})


def optimizer_states(run: Path, stage: str, tag: str) -> list[dict]:
    files = sorted((run / "phases" / stage / "checkpoints" / tag).glob("zero_pp_rank_*_optim_states.pt"))
    assert len(files) == 2
    return [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"] for f in files]


def test_optimizer_holds_state_for_trained_parameters_only(run: Path):
    trained = manifests(run)[0]["trainable"]["trainable_params"]
    assert trained == sum(saved(run, "00-upper")[n].numel() for n in ("lm_head.weight",) + tuple(
        n for n in saved(run, "00-upper") if n.startswith("model.layers.0.")))
    for key in ("exp_avg", "exp_avg_sq"):
        held = sum(state[key].numel() for rank in optimizer_states(run, "00-upper", "step4") for state in rank["state"].values())
        assert held == trained, f"{key}: one value per trained element, across the 2 ZeRO-3 partitions"


def test_each_group_trains_at_the_scheduled_lr_times_its_multiplier(run: Path):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    config = json.loads((run / "phases" / "00-upper" / "ds_config.json").read_text())
    # layer 0 of L = 2 decoder layers: 0.5^(2 - 1); the head: 1 x its lr_scale 2.
    multipliers = [0.5, 2.0]
    seen = []
    for position in (2, 4):
        reference = WarmupCosineLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), **config["scheduler"]["params"])
        reference.step(position)
        scheduled = reference.get_lr()[0]
        groups = optimizer_states(run, "00-upper", f"step{position}")[0]["param_groups"]
        assert [g["lr_scale"] for g in groups] == multipliers
        assert [g["lr"] for g in groups] == pytest.approx([scheduled * m for m in multipliers], rel=1e-12)
        seen.append(scheduled)
    assert seen[0] > seen[1] == pytest.approx(1e-4), "two positions of the cosine: mid-way, then its floor"


def test_penalties_count_the_trained_weights_only(run: Path):
    weights = saved(run, "00-upper")
    trained = [w for name, w in weights.items() if w.dim() >= 2 and name not in frozen_names(run, "00-upper")]
    everything = [w for w in weights.values() if w.dim() >= 2]
    penalties = manifests(run)[0]["regularization"]
    assert penalties["train/l1_penalty"] == pytest.approx(L1 * sum(w.abs().sum().item() for w in trained), rel=1e-5)
    assert penalties["train/l2_penalty"] == pytest.approx(L2 * sum(w.pow(2).sum().item() for w in trained), rel=1e-5)
    assert penalties["train/l2_penalty"] < 0.8 * L2 * sum(w.pow(2).sum().item() for w in everything), "frozen weights are not in it"


def test_moments_carry_only_while_the_same_parameters_train_in_the_same_groups(run: Path):
    records = manifests(run)
    assert [m["load"]["mode"] for m in records] == ["init", "full_state", "weights_only", "weights_only", "weights_only"]
    trained = [m["trainable"]["trainable_params"] for m in records]
    assert f"trainable set changed ({trained[1]:,} -> {trained[2]:,} parameters" in records[2]["load"]["reason"]
    # AdamW counts its steps in the state it keeps per partition: upper-again's carried on from upper's 4, lower's started afresh.
    steps = {stage: {int(state["step"]) for rank in optimizer_states(run, stage, "step2") for state in rank["state"].values()}
             for stage in ("01-upper-again", "02-lower")}
    assert steps == {"01-upper-again": {4 + 2}, "02-lower": {2}}
    assert records[1]["trainable"]["layout"] == records[0]["trainable"]["layout"] != records[2]["trainable"]["layout"]
    # The decision stage.json carried is the one carried out.
    assert [stage_file(run, s)["start"]["mode"] for s in STAGES] == [m["load"]["mode"] for m in records]


def test_manifest_records_the_selectors_counts_and_group_lrs(run: Path):
    upper, again, *_ = manifests(run)
    assert upper["trainable"]["train"] == ["head", "layers[0]"] and upper["trainable"]["layer_decay"] == 0.5
    assert [(g["label"], g["lr_scale"], g["lr"]) for g in upper["trainable"]["groups"]] == [("layer 0", 0.5, 5e-4), ("head", 2.0, 2e-3)]
    assert [(g["label"], g["lr_scale"]) for g in again["trainable"]["groups"]] == [("layer 0", 0.25), ("head", 0.5)]
    assert upper["trainable"]["share"] == pytest.approx(upper["trainable"]["trainable_params"] / upper["trainable"]["total_params"])
    assert sum(g["params"] for g in upper["trainable"]["groups"]) == upper["trainable"]["trainable_params"]
