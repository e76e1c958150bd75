"""Bad plans: one clear message naming the field, the value and what is allowed; exit code 2;
nothing written, nothing launched."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, REPO, cli, finetune_phase, harness, make_plan, pretrain_phase, write_plan
from harness.launch.setup import prepare
from harness.plan import PlanError, parse_plan


def good_plan() -> dict:
    return make_plan("errors", [pretrain_phase("pre"), finetune_phase("sft")], port=29500)


def with_change(path: str, value):
    plan = good_plan()
    *parents, last = path.split(".")
    node = plan
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return plan


DELETE = object()

# (change to a good plan, field path in the message, words of what is allowed)
CASES = [
    ("phases.0.zero_stage", 4, "phases[0].zero_stage", "0, 1, 2, 3 or 'auto'"),
    ("phases.0.optimizer", {"type": "Adamax", "lr": 0.1}, "phases[0].optimizer", "unknown optimizer type 'Adamax'"),
    ("phases.0.optimizer", {"type": "AdamW", "lr": -0.1}, "phases[0].optimizer.lr", "greater than 0"),
    ("phases.0.optimizer", {"type": "SGD", "lr": 0.1, "betas": [0.9, 0.99]}, "phases[0].optimizer", "SGD does not take ['betas']"),
    ("phases.0.optimizer", {"type": "AdamW", "lr": 0.1, "nesterov": True}, "phases[0].optimizer", "AdamW does not take ['nesterov']"),
    ("phases.0.global_batch", 12, "phases[0].global_batch", "a multiple of micro_batch x world size = 4 x 2 = 8"),
    ("phases.0.data", {"files": ["missing.txt"]}, "phases[0].data.files[0]", "an existing file"),
    ("phases.0.precision", "fp16", "phases[0].precision", "fp32 or bf16 on CPU"),
    ("phases.0.kind", "distill", "phases[0].kind", "'pretrain', 'finetune', 'preference' or 'multistep'"),
    ("phases.0.bogus_key", 1, "phases[0].bogus_key", "Extra inputs are not permitted"),
    ("phases.0.steps", DELETE, "phases[0]", "give exactly one of steps, epochs, tokens"),
    ("phases.0.epochs", 2, "phases[0].epochs", "pretrain phases take steps or tokens"),
    ("phases.0.offload", {"params": True}, "phases[0]", "offload.params needs zero_stage 3"),
    ("phases.0.optimizer", {"type": "Lion", "lr": 1e-4}, "phases[0].optimizer.type", "Lamb/Lion fail on CPU"),
    ("phases.1.name", "pre", "phases", "phase names must be unique"),
    ("phases.0.name", "Has Space", "phases[0].name", "should match pattern"),
    ("cluster.launcher", "mpi", "cluster.launcher", "'local', 'pdsh' or 'slurm'"),
    ("model", {"builtin": "tiny-llama", "path": "/x"}, "model", "exactly one of model.builtin or model.path"),
    ("phases.0.scheduler", {"type": "Cosine"}, "phases[0].scheduler.type", "'WarmupCosineLR'"),
    ("phases.0.deepspeed", {"zero_optimization": {"stage": 2, "overlap_com": True}}, "stage 'pre' deepspeed", "overlap_com"),
    ("phases.0.deepspeed", {"zero_optimisation": {"stage": 2}}, "stage 'pre' deepspeed", "unknown top-level DeepSpeed key 'zero_optimisation'"),
    ("phases.0.micro_batch", 0, "phases[0].micro_batch", "a whole number >= 1, or auto"),
    ("phases.0.micro_batch", "largest", "phases[0].micro_batch", "a whole number >= 1, or auto"),
    ("phases.0.micro_batch", "auto", "phases[0]", "micro_batch auto keeps the global batch while it picks the micro batch: set global_batch"),
    ("phases.0.fast", "fastest", "phases[0].fast", "auto, off, or a mapping of parts"),
    ("phases.0.fast", {"compyle": True}, "phases[0].fast", "compyle: Extra inputs are not permitted"),
    ("phases.0.fast", {"attention": "xformers"}, "phases[0].fast", "attention: Input should be 'auto', 'sdpa', 'flash' or 'eager'"),
]


@pytest.mark.parametrize("change,value,field,allowed", CASES, ids=[c[2] + ":" + str(c[1])[:20] for c in CASES])
def test_bad_plan_is_refused_with_field_value_and_allowed(tmp_path: Path, change, value, field, allowed):
    plan_path = write_plan(tmp_path, with_change(change, value))
    with pytest.raises(PlanError) as error:
        prepare(plan_path, tmp_path / "run")
    problems = [(path, allowed_text) for path, _, allowed_text in error.value.problems]
    assert any(path == field and allowed in text for path, text in problems), error.value.message()
    assert not (tmp_path / "run").exists()


MULTISTEP_DATA = {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}}


def multistep_phase(name: str, stages: list[dict], data: dict = MULTISTEP_DATA) -> dict:
    return {"name": name, "kind": "multistep", "data": data, "stages": stages}


def test_every_problem_is_reported_at_once(tmp_path: Path):
    """Schema errors, a missing data file and the errors of multistep stages (their own fields, and
    once merged over their phase) come in one report: fixing one problem does not reveal the next."""
    plan = good_plan()
    plan["phases"][0]["zero_stage"] = 7
    plan["cluster"]["procs_per_node"] = 0
    plan["phases"][1]["data"] = {"files": ["missing.jsonl"]}
    plan["phases"].append(multistep_phase("typo", [{"steps": 0, "stepz": 3}]))
    plan["phases"].append(multistep_phase("merged", [{"steps": 3, "optimizer": {"type": "SGD", "lr": 0.1, "betas": [0.9, 0.9]}}]))
    with pytest.raises(PlanError) as error:
        prepare(write_plan(tmp_path, plan), tmp_path / "run")
    fields = {path for path, _, _ in error.value.problems}
    assert {"phases[0].zero_stage", "cluster.procs_per_node", "phases[1].data.files[0]", "phases[2].stages[0].steps",
            "phases[2].stages[0].stepz", "phases[3].stages[0].optimizer"} <= fields, error.value.message()
    assert not (tmp_path / "run").exists()


# (phase kind, its data, the one problem reported: field path, words of what is allowed)
DATA_CASES = [
    ("pretrain", {"files": []}, "phases[0].data", "give exactly one of files, hub or sources"),
    ("pretrain", {"files": [str(PRETRAIN_TEXT)], "format": "csv"}, "phases[0].data.format", "'auto', 'text', 'json' or 'parquet'"),
    ("pretrain", {"files": [str(PRETRAIN_TEXT)], "hub": "org/set"}, "phases[0].data", "give exactly one of files, hub or sources"),
    ("finetune", {"files": [str(FINETUNE_JSONL)], "eval_fraction": 1.0}, "phases[0].data.eval_fraction", "less than 1"),
    ("finetune", {"files": [str(FINETUNE_JSONL)], "pretrain": {"files": []}}, "phases[0].data.pretrain", "Extra inputs are not permitted"),
    ("multistep", {**MULTISTEP_DATA, "pretrain": {"files": []}}, "phases[0].data.pretrain", "give exactly one of files, hub or sources"),
    ("multistep", {**MULTISTEP_DATA, "finetune": {"files": [str(FINETUNE_JSONL)], "eval_fraction": 0}}, "phases[0].data.finetune.eval_fraction", "greater than 0"),
    ("multistep", {"files": [str(PRETRAIN_TEXT)]}, "phases[0]", "a multistep phase needs data: {pretrain: ..., finetune: ..., mix: ...}"),
]


@pytest.mark.parametrize("kind,data,field,allowed", DATA_CASES, ids=[f"{c[0]}:{c[2]}:{c[3][:20]}" for c in DATA_CASES])
def test_a_data_problem_is_reported_for_the_form_the_phase_kind_takes(kind, data, field, allowed):
    """data is one data set for pretrain and finetune phases, a pretrain/finetune pair for multistep:
    only the problems of the form the phase's kind takes are reported, not those of the other."""
    phase = multistep_phase("p", [{"steps": 3}], data) if kind == "multistep" else {"name": "p", "kind": kind, "data": data, "steps": 3}
    with pytest.raises(PlanError) as error:
        parse_plan(make_plan("data", [phase], port=29500), REPO)
    problems = [(path, allowed_text) for path, _, allowed_text in error.value.problems]
    assert len(problems) == 1 and problems[0][0] == field and allowed in problems[0][1], error.value.message()


@pytest.mark.parametrize("command", ["plan", "run"])
def test_cli_exits_2_and_writes_and_launches_nothing(tmp_path: Path, command):
    plan = good_plan()
    plan["phases"][0]["zero_stage"] = 4
    out = tmp_path / "run"
    result = cli(command, write_plan(tmp_path, plan), "--out", out)
    assert result.returncode == 2
    assert "phases[0].zero_stage: 4 -> Input should be 0, 1, 2, 3 or 'auto'" in result.stderr
    assert not out.exists()
    assert "deepspeed" not in result.stdout.lower()


def test_a_changed_plan_is_refused_for_an_existing_run_unless_forced(tmp_path: Path):
    out = tmp_path / "run"
    plan_path = write_plan(tmp_path, good_plan())
    assert cli("plan", plan_path, "--out", out).returncode == 0
    before = (out / "phases" / "00-pre" / "ds_config.json").read_text()
    changed = copy.deepcopy(good_plan())
    changed["phases"][0]["micro_batch"] = 2
    write_plan(tmp_path, changed)
    refused = cli("plan", plan_path, "--out", out)
    assert refused.returncode == 2 and "--out" in refused.stderr and "--force" in refused.stderr
    assert (out / "phases" / "00-pre" / "ds_config.json").read_text() == before
    assert cli("plan", plan_path, "--out", out, "--force").returncode == 0
    assert '"train_micro_batch_size_per_gpu": 2' in (out / "phases" / "00-pre" / "ds_config.json").read_text()


def test_slurm_launcher_outside_an_allocation_is_refused_before_anything_is_written(tmp_path: Path):
    plan = good_plan()
    plan["cluster"]["launcher"] = "slurm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_JOB")}
    result = harness("run", write_plan(tmp_path, plan), "--out", tmp_path / "run", env=env)
    assert result.returncode == 2 and "cluster.launcher: 'slurm' -> runs inside a SLURM allocation" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_plan_file_and_broken_yaml(tmp_path: Path):
    missing = cli("plan", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert missing.returncode == 2 and "an existing plan file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    result = cli("plan", broken, "--out", tmp_path / "run")
    assert result.returncode == 2 and "valid YAML" in result.stderr
    assert not (tmp_path / "run").exists()
