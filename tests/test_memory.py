"""Memory as part of the plan: the per-rank estimate, what the `auto` settings choose by it, the refusal
of a stage that cannot fit, and activation checkpointing.

Launch side (no ranks): the estimate's terms follow ZeRO, world size, offload and checkpointing;
zero_stage/activation_checkpointing/offload auto take the first configuration that fits a rank's
memory (cluster.rank_memory_gb stands for a smaller machine); a stage that fits in none is exit 2
with the changes that would fit, before anything is written. Ranks (real DeepSpeed on 2 CPU ranks):
checkpointing gives the loss and gradients of no checkpointing at every ZeRO stage, with frozen
parameters and compiled; a capped auto plan runs ZeRO-3 with checkpointing and records why.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli, harness, make_plan, pretrain_phase, write_plan
from harness.plan import BUILTIN_CONFIGS, BYTE_VOCAB, PlanError, parse_plan
from harness.records import CheckpointRecord, Progress, StageDir
from harness.stages import engine_identity, expand_stages
from harness.stages.fit import MARGIN, MachineMemory
from harness.stages.resume import resume_point

GB = 10**9
SMALL = {**BUILTIN_CONFIGS["small-llama"], "vocab_size": BYTE_VOCAB}
LLAMA_309M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816, vocab_size=259, tie_word_embeddings=False)
MEDIUM = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=BYTE_VOCAB,
              tie_word_embeddings=False)
MACHINE = MachineMemory(gpu_bytes=80 * GB, host_bytes=24 * GB)


def stage_of(config: dict = SMALL, accelerator: str = "cpu", procs: int = 2, cluster: dict | None = None, **settings):
    plan = make_plan("t", [pretrain_phase("p", **settings)], port=30500, procs=procs)
    plan["cluster"].update(cluster or {})
    (stage,) = expand_stages(parse_plan(plan, REPO), accelerator, count_train_rows=lambda spec: 760, model_config=config,
                             wandb_mode="disabled", machine=MACHINE)
    return stage


def total(**settings) -> int:
    return stage_of(**settings).memory.estimate.total_bytes


def test_the_estimate_follows_zero_world_offload_checkpointing_and_vocab():
    big = dict(config=LLAMA_309M, seq_len=128, micro_batch=2)
    params = 308_861_952
    # ZeRO-3 shards weights, fp32 master, gradients and Adam's moments: 4 + 4 + 4 + 8 bytes per parameter / world
    z3 = stage_of(**big, zero_stage=3).memory.estimate
    held = z3.held["weights"] + z3.held["master weights"] + z3.held["gradients"] + z3.held["optimizer"]
    assert held == pytest.approx(20 * params / 2, rel=1e-6)
    # every higher stage shards more, per rank; more ranks shard further
    per_stage = [total(**big, zero_stage=z) for z in range(4)]
    assert per_stage == sorted(per_stage, reverse=True), per_stage
    assert total(**big, zero_stage=3, procs=4) < per_stage[3]
    # full checkpointing keeps less than selective, selective less than none; the logits grow with the vocabulary
    long = dict(config=SMALL, seq_len=1024, micro_batch=8)
    acts = [stage_of(**long, activation_checkpointing=mode).memory.estimate.forward["activations"] for mode in ("off", "selective", "full")]
    assert acts[0] > acts[1] > acts[2], acts
    logits = [stage_of(config={**SMALL, "vocab_size": v}, seq_len=256).memory.estimate.forward["logits"] for v in (259, 32000)]
    assert logits[1] == pytest.approx(logits[0] * 32000 / 259)
    # on cuda, offload moves the optimizer's states to host memory; on cpu they are host memory already,
    # and offload only adds its second gradient partition
    gpu = stage_of(**big, accelerator="cuda", zero_stage=2, offload={"optimizer": True}).memory.estimate
    assert gpu.host["optimizer"] == 8 * params // 2 and "optimizer" not in gpu.held
    assert total(**big, zero_stage=2, offload={"optimizer": True}) > per_stage[2]


def test_zero_stage_auto_takes_the_lowest_stage_that_fits_and_checkpointing_only_when_nothing_fits_without():
    auto = dict(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage="auto", activation_checkpointing="auto", offload="auto")
    # 12 GB per rank (24 GB / 2): ZeRO-0 fits, nothing else is needed
    roomy = stage_of(**auto)
    assert (roomy.zero_stage, roomy.activation_checkpointing, roomy.offload.optimizer) == (0, "off", False)
    assert [d.field for d in roomy.memory.decisions] == ["zero_stage", "offload", "activation_checkpointing"]
    # a cap that only ZeRO-3 with checkpointing fits: between its estimate and every other configuration's
    others = [total(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage=z, activation_checkpointing=c)
              for z in range(4) for c in ("off", "full") if (z, c) != (3, "full")]
    only = total(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage=3, activation_checkpointing="full")
    assert only < min(others)
    cap = (only + min(others)) / 2 * (1 + MARGIN)
    capped = stage_of(**auto, cluster={"rank_memory_gb": cap / GB})
    assert (capped.zero_stage, capped.activation_checkpointing, capped.offload.optimizer) == (3, "full", False)
    reasons = {d.field: d.reason for d in capped.memory.decisions}
    assert reasons["zero_stage"].startswith("ZeRO-3, checkpointing full: ") and "ZeRO-2 " in reasons["zero_stage"]
    assert capped.memory.rank_memory.source == f"cluster.rank_memory_gb {cap / GB:g}"
    # the DeepSpeed config carries the choice out
    from harness.stages.ds_config import get_train_ds_config
    assert get_train_ds_config(capped)["zero_optimization"]["stage"] == 3


def test_offload_auto_only_when_nothing_fits_without_it():
    auto = dict(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage="auto", offload="auto", accelerator="cuda", procs=1)
    on_gpu = stage_of(**auto, cluster={"rank_memory_gb": 4})  # 1 GPU of 4 GB: one rank holds its optimizer states whole at any stage
    assert on_gpu.offload.optimizer and on_gpu.zero_stage == 1
    assert stage_of(**auto, cluster={"rank_memory_gb": 40}).offload.optimizer is False


def test_micro_batch_auto_starts_its_probe_at_the_largest_the_estimate_fits():
    long = dict(config=SMALL, seq_len=1024, micro_batch="auto", global_batch=32)
    roomy = stage_of(**long)
    assert (roomy.micro_batch_candidates, roomy.micro_batch, roomy.grad_accum) == ([1, 2, 4, 8, 16], 16, 1)
    cap = total(config=SMALL, seq_len=1024, micro_batch=4) * (1 + MARGIN) + 1
    capped = stage_of(**long, cluster={"rank_memory_gb": cap / GB})
    assert (capped.micro_batch, capped.grad_accum) == (4, 4)
    assert capped.memory.decisions[-1].field == "micro_batch" and "starts at 4" in capped.memory.decisions[-1].reason


def test_a_plan_no_configuration_fits_exits_2_with_the_changes_that_would(tmp_path: Path):
    # activations fill the rank: checkpointing or a smaller micro batch would fit, more ranks would not
    long = dict(config=SMALL, seq_len=1024, micro_batch=8, zero_stage=1)
    plan = make_plan("t", [pretrain_phase("p", **{k: v for k, v in long.items() if k != "config"}, global_batch=16)], port=30500,
                     model={"builtin": "small-llama"})
    plan["cluster"]["rank_memory_gb"] = total(**long, activation_checkpointing="full") * (1 + MARGIN) / GB + 0.01
    out = tmp_path / "run"
    refused = cli("plan", write_plan(tmp_path, plan), "--out", out)
    assert refused.returncode == 2 and not out.exists()
    message = refused.stderr
    assert f"phases[0].memory: '{total(**long) / GB:.2f} GB per rank' -> at most" in message
    assert "The estimate (ZeRO-1): runtime 0.50 + weights" in message and "max(forward: activations" in message  # the breakdown
    changes = message.split("Changes that would fit: ")[1].strip().split("; ")
    assert [change.split(" (")[0] for change in changes] == ["activation_checkpointing: full", "micro_batch: 2"], changes
    assert "(4 accumulation steps, global_batch 16 kept)" in changes[1]
    # model states fill it: a higher ZeRO stage would fit; at ZeRO-3, more nodes would
    def changes_for(zero_stage: int, cap: float) -> list[str]:
        with pytest.raises(PlanError) as refused:
            stage_of(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage=zero_stage, cluster={"rank_memory_gb": cap * (1 + MARGIN) / GB + 0.01})
        return [change.split(" (")[0] for change in refused.value.problems[0][2].split("Changes that would fit: ")[1].split("; ")]

    big = dict(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage=3)
    assert changes_for(2, total(**big)) == ["zero_stage: 3"]
    assert changes_for(3, total(**big, procs=4)) == ["nodes: 2"]


def test_auto_without_a_known_memory_asks_for_it():
    plan = make_plan("t", [pretrain_phase("p", zero_stage="auto")], port=30500)
    with pytest.raises(PlanError, match=r"phases\[0\]\.zero_stage: 'auto' -> a fixed value, or cluster\.rank_memory_gb"):
        expand_stages(parse_plan(plan, REPO), "cuda", count_train_rows=lambda spec: 760, model_config=SMALL, wandb_mode="disabled",
                      machine=MachineMemory(gpu_bytes=None, host_bytes=24 * GB))


def test_a_resumed_stage_whose_decision_changed_follows_the_resume_rules(tmp_path: Path):
    """The data is the same, the memory is not: a checkpoint saved at ZeRO-0 resumes into the ZeRO-3 the
    smaller memory now picks through its consolidated fp32 weights (harness/stages/resume.py)."""
    auto = dict(config=LLAMA_309M, seq_len=128, micro_batch=2, zero_stage="auto")
    before, after = stage_of(**auto), stage_of(**auto, cluster={"rank_memory_gb": 5})
    assert (before.zero_stage, after.zero_stage) == (0, 3)
    stage_dir = StageDir(tmp_path)
    (stage_dir.checkpoints / "step2").mkdir(parents=True)
    CheckpointRecord(progress=Progress(stage_step=2), engine=engine_identity(before), files={}).write(stage_dir.checkpoints / "step2" / "complete")
    point = resume_point(after, stage_dir)
    assert point.mode == "consolidated" and "ZeRO stage 0 -> 3" in point.reason


def test_checkpointing_gives_the_loss_and_gradients_of_none_at_every_zero_stage():
    """tests/checkpointing_grads.py on 2 ranks under the deepspeed launcher: for ZeRO 0-3, full and
    selective checkpointing against none; with frozen parameters at ZeRO-3; compiled at ZeRO-2.
    Tolerance: the loss to 1e-6 relative and every gradient element to 1e-5 of the largest one:
    the recompute runs the same kernels on the same inputs (fp32 on CPU); compiled, inductor fuses
    and reorders the float sums."""
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "30510",
                             str(REPO / "tests" / "checkpointing_grads.py")], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in reversed(result.stdout.splitlines()) if line.lstrip().startswith("{"))
    found = json.loads(line[line.index("{"):])
    for name, case in found.items():
        expected = "off" if name.endswith("-off") else ("full" if name.endswith("full") else "selective (every 2)")
        assert case["ran"]["activation_checkpointing"] == expected and case["ran"]["fallbacks"] == {}, (name, case["ran"])
        if case["ran"]["compile"] == "off":  # the layers really ran again in the backward (compiled: hooks run at trace time)
            assert case["mlp_forwards"] == {"off": [1, 1], "full": [2, 2], "selective (every 2)": [2, 1]}[expected], (name, case)
        assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-6), (name, case)
        assert case["grad_diff"] <= 1e-5 * case["grad_max"], (name, case["grad_diff"], case["grad_max"])
    assert found["z2-compiled-full"]["ran"]["compile"] == "engine"
    frozen = found["z3-frozen-full"]["params"]
    assert frozen and all(name.startswith(("model.layers.1.", "lm_head")) for name in frozen), frozen
    # the stages really differ: ZeRO-3's gradients come from its partitions, ZeRO-0's whole
    assert found["z3-full"]["loss"] == pytest.approx(found["z0-off"]["loss"], rel=1e-6)


def test_a_capped_auto_plan_runs_zero3_with_checkpointing_and_records_why(tmp_path: Path):
    """An 8.4M-parameter Llama (a local folder) on 2 CPU ranks, zero_stage and activation_checkpointing
    auto, under a rank memory that only ZeRO-3 with full checkpointing fits: harness plan shows the
    choice, the stage runs it, and stage.json, the manifest and every rank's memory record say so."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MEDIUM)).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    settings = dict(seq_len=64, micro_batch=4, steps=2)
    others = [total(config=config, **settings, zero_stage=z, activation_checkpointing=c) for z in range(4) for c in ("off", "full") if (z, c) != (3, "full")]
    only = total(config=config, **settings, zero_stage=3, activation_checkpointing="full")
    assert only < min(others)  # sharding saves more than ZeRO-3's gathered layers and its runtime cost
    plan = make_plan("capped", [pretrain_phase("p", zero_stage="auto", activation_checkpointing="auto", **settings)], port=30520,
                     model={"path": str(tmp_path / "model"), "tokenizer": "bytes"})
    plan["cluster"]["rank_memory_gb"] = (only + min(others)) / 2 * (1 + MARGIN) / GB
    path, out = write_plan(tmp_path, plan), tmp_path / "run"
    shown = cli("plan", path, "--out", out, check=True).stdout
    assert "zero_stage auto -> 3: ZeRO-3, checkpointing full:" in shown and "activation_checkpointing auto -> full" in shown
    harness("run", path, "--out", out, check=True)
    stage_dir = out / "phases" / "00-p"
    spec = json.loads((stage_dir / "stage.json").read_text())["stage"]
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert (spec["zero_stage"], spec["activation_checkpointing"]) == (3, "full")
    assert manifest["engine"]["zero_stage"] == 3 and manifest["fast"]["activation_checkpointing"] == "full"
    assert {d["field"]: d["value"] for d in manifest["memory"]["decisions"]} == {"zero_stage": "3", "activation_checkpointing": "full"}
    assert json.loads((stage_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    for rank in (0, 1):
        record = json.loads((stage_dir / "ranks" / f"memory-rank{rank}.json").read_text())
        assert record["estimate_bytes"] == only and record["milestones"]["end"]["peak_rss_bytes"] > 0
