"""Before anything launches: validate a plan, bind it to an output folder, write each stage's files.

Everything here raises PlanError (exit 2) before the first file is written, or writes the
files `harness plan`, `run` and `submit` share: the plan copy and digest, and per stage
stage.json, ds_config.json and command.txt. Never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.ds_config import check_ds_config, get_train_ds_config, validate_with_deepspeed
from harness.hosts import hostfile_path
from harness.launch import deepspeed_binary, launcher_command, shell_quote
from harness.layout import RunDir, StageDir
from harness.manifest import manifest_written
from harness.plan import BUILTIN_CONFIGS, DataSpec, ModelSpec, Plan, PlanError, load_plan
from harness.processes import first_port
from harness.stages import Stage, eval_size, expand_stages
from harness.token_store import count_rows


@dataclass
class RunSetup:
    """A validated plan, its stages and their DeepSpeed configs, bound to an output folder."""

    plan_text: str
    plan: Plan
    stages: list[Stage]
    configs: list[dict[str, Any]]
    run: RunDir


def detect_accelerator(choice: str) -> str:
    """'cuda' when asked or when nvidia-smi lists a GPU, else 'cpu'."""
    if choice != "auto":
        return choice
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if "GPU" in listing else "cpu"


def count_train_rows(spec: DataSpec) -> int:
    """Rows of a fine-tune data set that are trained on (all rows minus the eval hold-out)."""
    rows = count_rows(spec)
    return rows - eval_size(rows, spec)


def model_config(model: ModelSpec) -> dict[str, Any]:
    """The model's config.json (a built-in's config), for the shape the DeepSpeed config needs."""
    if model.builtin is not None:
        return BUILTIN_CONFIGS[model.builtin]
    return json.loads((Path(model.path) / "config.json").read_text())


def validated_stages(plan_path: str | Path) -> tuple[Plan, list[Stage], list[dict[str, Any]]]:
    """The plan, its stages and their DeepSpeed configs, all checked; raises PlanError on any problem."""
    plan = load_plan(plan_path)
    stages = expand_stages(plan, detect_accelerator(plan.cluster.accelerator), count_train_rows, model_config(plan.model))
    configs = [get_train_ds_config(stage) for stage in stages]
    problems = []
    for stage, config in zip(stages, configs):
        problems += [(f"stage '{stage.name}' deepspeed config", config.get("train_batch_size"), p) for p in check_ds_config(config, stage.world_size)]
    problems += [(f"stage '{stages[index].name}' deepspeed", None, problem) for index, problem in validate_with_deepspeed(configs)]
    if problems:
        raise PlanError(problems)
    return plan, stages, configs


def plan_configs(plan_path: str | Path) -> dict[str, dict[str, Any]]:
    """'<NN>-<stage>' -> DeepSpeed config, for every stage of a plan."""
    _, stages, configs = validated_stages(plan_path)
    return {f"{stage.index:02d}-{stage.name}": config for stage, config in zip(stages, configs)}


def prepare(plan_path: str | Path, out: str | Path, force: bool = False) -> RunSetup:
    """Validate everything before anything is written; raises PlanError on any problem."""
    plan, stages, configs = validated_stages(plan_path)
    setup = RunSetup(Path(plan_path).read_text(), plan, stages, configs, RunDir(Path(out).resolve()))
    _check_same_plan(setup, force)
    return setup


def _check_same_plan(setup: RunSetup, force: bool) -> None:
    digest_file = setup.run.plan_digest
    if digest_file.exists() and digest_file.read_text().strip() != _digest(setup.plan_text) and not force:
        raise PlanError([(
            "--out", str(setup.run.root),
            "holds a run of a different plan; use another --out, or --force to continue it with this plan "
            "(finished stages are kept as they are)",
        )])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_setup(setup: RunSetup) -> list[list[str]]:
    """Write the plan copy and every unfinished stage's files; return each stage's launcher argv
    (as `harness plan` shows it: the port is the first one tried). A finished stage's files are
    left untouched: they record what ran."""
    run = setup.run
    run.phases.mkdir(parents=True, exist_ok=True)
    run.plan_copy.write_text(setup.plan_text)
    run.plan_digest.write_text(_digest(setup.plan_text) + "\n")
    commands = []
    previous: StageDir | None = None
    for stage, config in zip(setup.stages, setup.configs):
        stage_dir = run.stage(stage.index, stage.name)
        argv = launcher_command(stage, stage_dir, stage.cluster.master_addr, first_port(stage), deepspeed_binary(sys.executable), hostfile_path(stage, stage_dir))
        commands.append(argv)
        if not manifest_written(stage_dir.manifest):
            stage_dir.root.mkdir(parents=True, exist_ok=True)
            stage_file = {"stage": stage.model_dump(mode="json"), "previous": str(previous.root) if previous else None, "run_dir": str(run.root)}
            stage_dir.stage_json.write_text(json.dumps(stage_file, indent=2) + "\n")
            stage_dir.ds_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            stage_dir.command.write_text(shell_quote(argv) + "\n")
        previous = stage_dir
    return commands
