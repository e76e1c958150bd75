"""The fast path (fast: auto | off | parts) and micro_batch: auto.

Launch side: what each stage turns on, per accelerator, and why a part is off. Worker side, with
real DeepSpeed ranks on CPU: a compiled stage's losses equal the eager stage's on the same
batches, its handoff loads in the next stage; a compile that fails to initialise falls back with
one warning line; micro_batch auto keeps the global batch and trains exactly like the micro
batch it picked, given in the plan.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, finetune_phase, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from harness.stages.ds_config import get_train_ds_config
from harness.stages.fast import micro_batch_candidates
from harness.plan import BUILTIN_CONFIGS, PlanError, parse_plan
from harness.records import StageDir
from harness.records import BatchRecord, ProbeTry
from harness.stages import expand_stages
from harness.worker.batch_probe import batch_shape, next_try, recorded_choice

GB = 10**9


def stage_of(phase: dict, accelerator: str = "cpu", procs: int = 2):
    plan = make_plan("t", [phase], port=29500, procs=procs)
    (stage,) = expand_stages(parse_plan(plan, REPO), accelerator, count_train_rows=lambda spec: 760,
                             model_config=BUILTIN_CONFIGS["tiny-llama"], wandb_mode="disabled")
    return stage


def test_auto_turns_nothing_on_until_measured_and_off_means_eager_sdpa():
    for accelerator in ("cpu", "cuda"):
        auto = stage_of(pretrain_phase("p"), accelerator).fast
        assert (auto.compile, auto.liger, auto.attention, auto.notes) == ("off", False, "sdpa", [])
    assert stage_of(pretrain_phase("p", fast="off"), "cuda").fast.parts == ["sdpa"]
    # packed rows in bf16 on CUDA: flash attention where it is installed (transformers' padding-free path)
    packed = finetune_phase("sft", data={"files": [str(REPO / "plans/data/finetune.jsonl")], "packing": True})
    assert stage_of(packed, "cuda").fast.attention == "flash-or-sdpa"
    assert stage_of(packed, "cpu").fast.attention == "sdpa"


def test_explicit_parts_and_why_a_part_is_off():
    cpu = stage_of(pretrain_phase("p", fast={"deepcompile": True, "liger": True, "attention": "flash"}), "cpu").fast
    assert (cpu.compile, cpu.liger, cpu.attention) == ("engine", False, "sdpa")
    assert [note.split(":")[0] for note in cpu.notes] == ["deepcompile", "liger", "attention"]
    cuda = stage_of(pretrain_phase("p", fast={"deepcompile": True, "liger": True, "attention": "flash"}, zero_stage=3), "cuda")
    assert (cuda.fast.compile, cuda.fast.liger, cuda.fast.attention, cuda.fast.notes) == ("deepcompile", True, "flash", [])
    assert get_train_ds_config(cuda)["compile"] == {"deepcompile": True}
    zero0 = stage_of(pretrain_phase("p", fast={"deepcompile": True}, zero_stage=0), "cuda").fast
    assert zero0.compile == "engine" and "zero_stage >= 1" in zero0.notes[0]
    assert "compile" not in get_train_ds_config(stage_of(pretrain_phase("p", fast={"compile": True}), "cuda"))


def test_a_multistep_stage_overrides_parts_of_its_phase():
    plan = make_plan("t", [{"name": "m", "kind": "multistep", "fast": {"compile": True},
                            "data": {"pretrain": {"files": [str(REPO / "plans/data/pretrain.txt")]}, "finetune": {"files": [str(REPO / "plans/data/finetune.jsonl")]}},
                            "stages": [{"steps": 2}, {"steps": 2, "fast": {"compile": False}}, {"steps": 2, "fast": "off"}]}], port=29500)
    stages = expand_stages(parse_plan(plan, REPO), "cpu", count_train_rows=lambda spec: 760, model_config=BUILTIN_CONFIGS["tiny-llama"], wandb_mode="disabled")
    assert [s.fast.compile for s in stages] == ["engine", "off", "off"]


def test_micro_batch_auto_candidates_keep_the_global_batch():
    assert micro_batch_candidates(48, 2) == [1, 2, 3, 4, 6, 8, 12, 24]
    stage = stage_of(pretrain_phase("p", micro_batch="auto", global_batch=16))
    # the memory of a rank is not given here: the probe starts at the smallest candidate (tests/test_memory.py: at the estimate's)
    assert (stage.micro_batch_candidates, stage.micro_batch, stage.grad_accum) == ([1, 2, 4, 8], 1, 8)
    with pytest.raises(PlanError, match=r"phases\[0\]\.global_batch: 9 -> a multiple of the world size \(2\) with micro_batch auto"):
        stage_of(pretrain_phase("p", micro_batch="auto", global_batch=9))


def probe_with(memory, candidates: list[int], budget: int, start: int | None = None) -> list[int]:
    """The micro batches next_try picks when a micro batch m peaks at memory(m) (None: out of memory)."""
    tries: list[ProbeTry] = []
    while (m := next_try(candidates, tries, budget, start)) is not None:
        peak = memory(m)
        tries.append(ProbeTry(micro_batch=m, peak_bytes=peak, fits=peak is not None and peak <= budget))
    return [t.micro_batch for t in tries]


def test_probe_jumps_to_the_largest_micro_batch_predicted_to_fit():
    candidates = micro_batch_candidates(256, 1)  # 1, 2, 4, ..., 256
    linear = lambda m: 10 * GB + m * GB // 2  # noqa: E731  model states + 0.5 GB per sample
    # 40 GB: up to 60 samples fit; 32 is the largest candidate, found on the third try
    assert probe_with(linear, candidates, 40 * GB) == [1, 2, 32]
    # memory grows faster than the line predicts: 32 does not fit, 16 does
    steep = lambda m: linear(m) if m < 16 else 10 * GB + m * GB  # noqa: E731
    assert probe_with(steep, candidates, 40 * GB) == [1, 2, 32, 16]
    # out of GPU memory: the probe stops there (the smallest candidate is then used)
    assert probe_with(lambda m: None, candidates, 40 * GB) == [1]
    assert probe_with(linear, candidates, 10 * GB) == [1]
    # started at the memory estimate's choice: up one candidate when it fits, down one at a time when not
    assert probe_with(linear, candidates, 40 * GB, start=32) == [32, 64]
    assert probe_with(steep, candidates, 40 * GB, start=32) == [32, 16]


def test_a_resumed_stage_keeps_the_micro_batch_its_probe_chose(tmp_path: Path):
    stage = stage_of(pretrain_phase("p", micro_batch="auto", global_batch=16))
    stage_dir = StageDir(tmp_path)
    BatchRecord(micro_batch=4, grad_accum=2, global_batch=16, world_size=2, chosen_by="probe").write(stage_dir.micro_batch)
    record = batch_shape(stage, stage_dir, strategy=None, build_model=None)  # no probe: nothing to build
    assert (record.micro_batch, record.grad_accum, record.chosen_by) == (4, 2, "recorded")
    # another global batch (the plan changed before the stage ran again): the record does not fit, probe again
    assert recorded_choice(stage_of(pretrain_phase("p", micro_batch="auto", global_batch=32)), stage_dir) is None


def test_compiled_stage_matches_eager_and_hands_off(tmp_path: Path):
    """Two runs of [sft, pre, post] on 2 CPU ranks, ZeRO-2. Run `eager`: sft with micro_batch 4,
    pre with fast: off. Run `fast`: sft with micro_batch auto (global batch 8); pre compiled, and
    liger asked for (off on CPU). post loads pre's full state in both."""
    def plan(name: str, port: int, sft: dict, pre_fast) -> Path:
        phases = [finetune_phase("sft", global_batch=8, steps=3, **sft), pretrain_phase("pre", steps=4, fast=pre_fast, eval_every=4),
                  pretrain_phase("post", steps=2)]
        return write_plan(tmp_path / name, make_plan(name, phases, port=port))

    fast = harness("run", plan("fast", 29830, {"micro_batch": "auto"}, {"compile": True, "liger": True}), "--out", tmp_path / "fast" / "run", check=True)
    harness("run", plan("eager", 29810, {"micro_batch": 4}, "off"), "--out", tmp_path / "eager" / "run", check=True)
    e_sft, e_pre, e_post = manifests(tmp_path / "eager" / "run")
    f_sft, f_pre, f_post = manifests(tmp_path / "fast" / "run")

    # micro_batch auto: the probe started at 4, the largest candidate the memory estimate fits (nothing
    # larger to try), kept the global batch, and left no trace: the stage trained exactly like
    # micro_batch 4 given in the plan.
    assert (f_sft["batch"]["chosen_by"], f_sft["batch"]["micro_batch"], f_sft["batch"]["grad_accum"]) == ("probe", 4, 1)
    assert [t["micro_batch"] for t in f_sft["batch"]["probe"]] == [4] and all(t["fits"] for t in f_sft["batch"]["probe"])
    assert [d["field"] for d in f_sft["memory"]["decisions"]] == ["micro_batch"]
    assert e_sft["batch"]["chosen_by"] == "plan"
    assert f_sft["weights_digest"] == e_sft["weights_digest"]
    assert json.loads((tmp_path / "fast/run/phases/00-sft/micro_batch.json").read_text())["micro_batch"] == 4

    # Compiled: the same losses as eager on the same batches from the same start (step 1 is the
    # fixed-batch check), to fp32 rounding: inductor fuses and reorders the float sums.
    assert f_pre["fast"]["compile"] == "engine" and f_pre["fast"]["fallbacks"] == {} and f_pre["fast"]["first_compiled_forward_s"] > 0
    assert e_pre["fast"]["compile"] == "off"
    assert "[harness] stage 01 fast: liger: its Triton kernels need a CUDA device; off on cpu" in fast.stdout
    assert f_pre["start_weights_digest"] == e_pre["start_weights_digest"]
    e_loss = [r["train/loss"] for r in metric_rows(tmp_path / "eager/run/phases/01-pre") if "train/loss" in r]
    f_loss = [r["train/loss"] for r in metric_rows(tmp_path / "fast/run/phases/01-pre") if "train/loss" in r]
    assert len(e_loss) == len(f_loss) == 4
    assert abs(f_loss[0] - e_loss[0]) <= 1e-5 * e_loss[0], (f_loss, e_loss)
    assert all(abs(f - e) <= 1e-3 * e for f, e in zip(f_loss, e_loss)), (f_loss, e_loss)
    assert abs(f_pre["eval"]["eval/loss"] - e_pre["eval"]["eval/loss"]) <= 1e-3 * e_pre["eval"]["eval/loss"]
    # The compiled stage's handoff: post started from exactly the weights pre saved, moments and all.
    for pre, post in ((e_pre, e_post), (f_pre, f_post)):
        assert post["load"]["mode"] == "full_state"
        assert post["start_weights_digest"] == pre["weights_digest"]
        assert post["start_optimizer_state_digest"] == pre["optimizer_state_digest"]


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning():
    """tests/fast_fallback.py: a one-rank DeepSpeed engine on a fixed batch, eager, compiled, and
    compiled with no working C++ compiler for inductor (set in-process, after DeepSpeed's own
    JIT op is built): the failed compile warns once and gives the eager loss exactly."""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "fast_fallback.py")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(found["compiled"] - found["eager"]) <= 1e-5 * found["eager"], found
    assert found["broken"] == found["eager"], found
    assert found["broken_record"]["compile"] == "off" and "compile" in found["broken_record"]["fallbacks"], found
    warnings = [line for line in result.stdout.splitlines() if "fast: compile off" in line]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0], result.stdout[-3000:]
