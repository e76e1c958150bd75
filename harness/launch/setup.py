"""Before anything launches: validate a plan, bind it to an output folder, write each stage's files.

Everything here raises PlanError (exit 2) before the first file is written, or writes the
files `harness plan`, `run` and `submit` share: the plan copy and digest, and per stage
stage.json and ds_config.json (command.txt is written when a launch starts, with its port).
Never imports torch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness import objectives
from harness.objectives import OBJECTIVES
from harness.objectives.samples import row_location
from harness.launch.command import deepspeed_binary, launcher_command
from harness.launch.hosts import hostfile_path, local_gpu_count, machine_memory
from harness.launch.jobs import FactsJob, read_param_table, validate_with_deepspeed
from harness.launch.processes import first_port
from harness.launch.wandb_mode import resolve_mode
from harness.plan import BUILTIN_CONFIGS, BYTE_VOCAB, DataSpec, ModelSpec, Plan, PlanError, folder_problem, load_plan
from harness.records import Adapter, ResumePoint, RunDir, StartDecision, is_done, older_format, read_manifest
from harness.stages import (Stage, StageFile, engine_identity, eval_size, expand_stages, launch_groups, stage_fields, stage_stores,
                            start_decision)
from harness.stages.ds_config import check_ds_config, deepspeed_block_problems, get_train_ds_config
from harness.stages.model_fit import facts_problems, facts_request, fit_stages
from harness.stages.params import ParamTable
from harness.stages.resume import ds_config_for, resume_point


@dataclass
class RunSetup:
    """A validated plan, its stages and their DeepSpeed configs, bound to an output folder."""

    plan_text: str
    plan: Plan
    stages: list[Stage]
    configs: list[dict[str, Any]]
    run: RunDir
    resumes: dict[int, ResumePoint]
    """Unfinished stages (by index): how each continues from its own checkpoints."""
    starts: dict[int, StartDecision]
    """Every stage (by index): how it takes over from the previous one (harness/stages/start.py)."""

    def unfinished(self) -> list[Stage]:
        return [stage for stage in self.stages if stage.index in self.resumes]


def detect_accelerator(choice: str) -> str:
    """'cuda' when asked or when nvidia-smi lists a GPU, else 'cpu'."""
    if choice != "auto":
        return choice
    return "cuda" if local_gpu_count() else "cpu"


def count_train_rows(spec: DataSpec) -> int:
    """Rows of a fine-tune data set that are trained on (all rows minus the eval hold-out; of a
    mixture, of every source)."""
    rows = [(objectives.count_rows(one), one) for one, _ in spec.weighted_sets()]
    return sum(n - eval_size(n, one) for n, one in rows)


def model_config(model: ModelSpec) -> dict[str, Any]:
    """The model's config.json (a built-in's config, with its tokenizer's vocabulary), for the shape the
    DeepSpeed config and the memory estimate need."""
    if model.builtin is not None:
        return {**BUILTIN_CONFIGS[model.builtin], "vocab_size": tokenizer_vocab(model.tokenizer)}
    return json.loads((Path(model.path) / "config.json").read_text())


def tokenizer_vocab(tokenizer: str | None) -> int:
    """Tokens of a tokenizer as the worker sizes a built-in model to it: the byte tokenizer's, or the
    ids of a folder's tokenizer.json (its model's vocabulary and added tokens)."""
    path = Path(tokenizer or "") / "tokenizer.json"
    if tokenizer in (None, "bytes") or not path.is_file():
        return BYTE_VOCAB
    spec = json.loads(path.read_text())
    vocab = spec.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [token["id"] for token in spec.get("added_tokens", [])]
    return max(ids, default=BYTE_VOCAB - 1) + 1


def validated_stages(plan_path: str | Path, warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
                     ) -> tuple[Plan, list[Stage], list[dict[str, Any]]]:
    """The plan, its stages and their DeepSpeed configs, all checked; raises PlanError on any problem,
    `warn`s one line for each thing that works but may not do what was meant. Only configs without
    a problem of their own are shown to DeepSpeed (an "auto" crashes its checks)."""
    plan = load_plan(plan_path, objectives.file_problem)
    # The model's and tokenizer's facts, found in a child process while the stages resolve.
    facts_job = FactsJob(facts_request(plan), plan.cache_dir)
    accelerator = detect_accelerator(plan.cluster.accelerator)
    local_gpus = local_gpu_count() if accelerator == "cuda" and plan.cluster.launcher == "local" else None
    # The model's parameter names, only if some stage's trainable set needs them: the model's own come
    # with its facts, a table with an adapter applied from another child process, once per adapter.
    adapted = functools.cache(lambda adapter_json: read_param_table(plan.model, Adapter.model_validate_json(adapter_json)))

    def model_params(adapter: Adapter | None) -> ParamTable:
        if adapter is not None:
            return adapted(adapter.model_dump_json())
        facts = facts_job.result()
        if facts.params is None:
            raise PlanError(facts_problems(facts, plan.model))
        return facts.params

    stages = expand_stages(plan, accelerator, count_train_rows, model_config(plan.model), local_gpus, model_params,
                           wandb_mode=resolve_mode(plan.wandb.mode), machine=machine_memory())
    fields = stage_fields(plan)
    configs = [get_train_ds_config(stage) for stage in stages]
    problems, sound = [], []
    for stage, config, where in zip(stages, configs, fields):
        own = [(f"{where}.deepspeed.{key}", value, allowed) for key, value, allowed in deepspeed_block_problems(stage)]
        own += [(f"stage '{stage.name}' deepspeed config", config.get("train_batch_size"), p) for p in check_ds_config(config, stage.world_size)]
        problems += own
        if not own:
            sound.append(stage)
    problems += [(f"stage '{sound[k].name}' deepspeed", None, problem) for k, problem in validate_with_deepspeed([configs[s.index] for s in sound])]
    facts = facts_job.result()
    stages, fit_problems, warnings = fit_stages(stages, fields, facts)
    problems = facts_problems(facts, plan.model) + fit_problems + problems
    if problems:
        raise PlanError(problems)
    for line in warnings:
        warn(f"[harness] warning: {line}")
    return plan, stages, configs


def plan_configs(plan_path: str | Path) -> dict[str, dict[str, Any]]:
    """'<NN>-<stage>' -> DeepSpeed config, for every stage of a plan."""
    _, stages, configs = validated_stages(plan_path)
    return {f"{stage.index:02d}-{stage.name}": config for stage, config in zip(stages, configs)}


def prepare(plan_path: str | Path, out: str | Path, force: bool = False) -> RunSetup:
    """Validate everything before anything is written: the plan, and that --out is a folder this user
    can write or create; raises PlanError listing every problem."""
    root = Path(out).resolve()
    out_problems = [("--out", str(out), why)] if (why := folder_problem(root)) else []
    try:
        plan, stages, configs = validated_stages(plan_path)
    except PlanError as error:
        raise PlanError(error.problems + out_problems) from None
    if out_problems:
        raise PlanError(out_problems)
    run, plan_text = RunDir(root), Path(plan_path).read_text()
    _check_same_plan(run, plan_text, force)
    _check_same_version(run)
    # How each unfinished stage continues; a stage that cannot raises PlanError here.
    resumes = {stage.index: resume_point(stage, run.stage(stage.index, stage.name)) for stage in stages if not is_done(run.stage(stage.index, stage.name))}
    return RunSetup(plan_text, plan, stages, configs, run, resumes, start_decisions(stages, run, resumes))


def check_built_stores(stages: list[Stage]) -> None:
    """What each stage's objectives find in its built token stores at its settings (a preference
    prompt that leaves no response token within seq_len): PlanError naming the file and line."""
    problems = []
    for stage in stages:
        for kind, request in ((kind, request) for kind, requests in stage_stores(stage).items() for request in requests):
            for sample, expected, found in OBJECTIVES[kind].built_store_problems(request.folder, stage.settings):
                file, where = (request.data.hub, f"row {sample + 1}") if request.data.hub else row_location(request.data, sample)
                problems.append((request.where, file, f"{expected} ({where} {found})"))
    if problems:
        raise PlanError(problems)


def start_decisions(stages: list[Stage], run: RunDir, resumes: dict[int, ResumePoint]) -> dict[int, StartDecision]:
    """How each stage takes over from the previous one: from what the previous stage's manifest
    records when it is done (it may have run under an earlier plan), else from the plan."""
    decisions = {}
    for before, stage in zip([None, *stages], stages):
        if before is None:
            previous = None
        elif before.index in resumes:
            previous = engine_identity(before)
        else:
            previous = read_manifest(run.stage(before.index, before.name), verify_files=False).engine
        decisions[stage.index] = start_decision(previous, engine_identity(stage))
    return decisions


def _check_same_plan(run: RunDir, plan_text: str, force: bool) -> None:
    if run.plan_digest.exists() and run.plan_digest.read_text().strip() != _digest(plan_text) and not force:
        raise PlanError([(
            "--out", str(run.root),
            "holds a run of a different plan; use another --out, or --force to continue it with this plan "
            "(finished stages are kept as they are)",
        )])


def _check_same_version(run: RunDir) -> None:
    older = [found for stage_dir in run.stage_dirs() if (found := older_format(stage_dir))]
    if older:
        raise PlanError([("--out", str(run.root), f"a run folder of this harness version; {older[0]} was written by an older one: "
                          "finish that run with the version that started it, or use a new --out (nothing in it was changed)")])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_setup(setup: RunSetup) -> list[tuple[list[Stage], list[str]]]:
    """Write the plan copy and every unfinished stage's files; return each launch (its stages and its
    launcher argv, as `harness plan` shows it: the port is the first one tried; the launch writes
    the argv it ran to command.txt). A finished stage's files are left untouched: they record what
    ran. An unfinished stage's stage.json carries how it resumes."""
    run = setup.run
    run.phases.mkdir(parents=True, exist_ok=True)
    run.plan_copy.write_text(setup.plan_text)
    run.plan_digest.write_text(_digest(setup.plan_text) + "\n")
    previous = None
    for stage, config in zip(setup.stages, setup.configs):
        stage_dir = run.stage(stage.index, stage.name)
        resume = setup.resumes.get(stage.index)
        if resume is not None:
            stage_dir.root.mkdir(parents=True, exist_ok=True)
            StageFile(stage=stage, previous=str(previous.root) if previous else None, run_dir=str(run.root), start=setup.starts[stage.index],
                      resume=resume).write(stage_dir.stage_json)
            stage_dir.ds_config.write_text(json.dumps(ds_config_for(resume, config), indent=2, sort_keys=True) + "\n")
        previous = stage_dir
    launches = []
    for group in launch_groups(setup.stages, set(setup.resumes)):
        dirs = [run.stage(stage.index, stage.name) for stage in group]
        argv = launcher_command(group[0], dirs, group[0].cluster.master_addr, first_port(group[0]), deepspeed_binary(sys.executable),
                                hostfile_path(group[0], dirs[0]))
        launches.append((group, argv))
    return launches
