"""Reading a plan: YAML in, a validated Plan out, or one PlanError that lists every problem.

`load_plan` reads the YAML, merges each phase over the plan's `defaults`, reads deepspeed JSON
files, validates the schema and then every block that is valid on its own (the model, the
cluster and its hostfile, each phase's stages and data files), so fixing one problem does not
reveal the next. No torch here: the launch side imports this.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from harness.plan.checks import FileProblem, check_cluster, check_phase, expand_files, folder_problem
from harness.plan.cluster import ClusterSpec
from harness.plan.data import DataSpec, MultistepData
from harness.plan.errors import PlanError, Problem, problems_from
from harness.plan.fields import Strict
from harness.plan.model import ModelSpec
from harness.plan.model_source import resolve_model
from harness.plan.phases import PhaseSpec, Plan, deep_merge


def parse_plan(raw: Any, base_dir: Path, file_problem: FileProblem | None = None) -> Plan:
    """Validate a plan given as plain data; relative file paths resolve against base_dir. Raises one
    PlanError with every problem: the schema's, and those found in each block that is valid on its
    own (the model, the cluster and its hostfile, each phase's stages and data files), so fixing
    one problem does not reveal the next. file_problem checks a sample of each data file (the
    objectives know what their rows must hold); without it, only that the files exist."""
    if not isinstance(raw, dict):
        raise PlanError([("", raw, "a plan is a mapping with name, model, phases")])
    raw = copy.deepcopy(raw)  # filled in below: the defaults, and deepspeed blocks read from files
    defaults = raw.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise PlanError([("defaults", defaults, "a mapping of phase settings")])
    problems = _read_deepspeed_files([("defaults", defaults), *_settings_blocks(raw.get("phases"))], base_dir)
    phases = raw.get("phases") if isinstance(raw.get("phases"), list) else []
    if phases:
        raw["phases"] = phases = [deep_merge(defaults, p) if isinstance(p, dict) else p for p in phases]
        for _, settings in _settings_blocks(phases):
            _zero_stage_from_block(settings)
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as error:
        plan = None
        problems += problems_from(error, "", raw)
    model = plan.model if plan else _valid(ModelSpec, raw.get("model"))
    cluster = plan.cluster if plan else _valid(ClusterSpec, raw.get("cluster", {}))
    if model is not None:
        model, model_problems = resolve_model(model, base_dir)
        problems += model_problems
    if cluster is not None:
        problems += check_cluster(cluster, base_dir)
    for i, phase in enumerate(plan.phases if plan else [_valid(PhaseSpec, p) for p in phases]):
        if phase is not None:
            problems += check_phase(i, phase, base_dir, file_problem)
    if plan is not None and (why := folder_problem(_cache_dir(plan, base_dir))):
        problems.append(("cache_dir", plan.cache_dir or str(default_cache_dir()), f"{why}: the token stores are built there"))
    if problems:
        raise PlanError(problems)
    return _resolve_paths(plan.model_copy(update={"model": model}), base_dir)


def _valid(model: type[Strict], value: Any) -> Any:
    """value as model, or None when it is not valid (the plan's validation lists its problems)."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _settings_blocks(phases: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, mapping) of every block of training settings in the raw phases: each phase,
    and each stage of a multistep phase."""
    for i, phase in enumerate(phases if isinstance(phases, list) else []):
        if isinstance(phase, dict):
            yield f"phases[{i}]", phase
            stages = phase.get("stages")
            for j, stage in enumerate(stages if isinstance(stages, list) else []):
                if isinstance(stage, dict):
                    yield f"phases[{i}].stages[{j}]", stage


def _read_deepspeed_files(blocks: list[tuple[str, dict[str, Any]]], base_dir: Path) -> list[Problem]:
    """Replace each `deepspeed:` value that is a path by the JSON object in that file (relative to
    the plan); the problems of those that cannot be read."""
    problems = []
    for where, settings in blocks:
        value = settings.get("deepspeed")
        if not isinstance(value, str):
            continue
        path = base_dir / os.path.expanduser(value)
        try:
            block = json.loads(path.read_text())
            why = "" if isinstance(block, dict) else f"{path} holds a JSON {type(block).__name__}"
        except OSError as error:
            why = f"{path} cannot be read ({error.strerror})"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            why = f"{path} is not valid JSON ({error})"
        if why:
            problems.append((f"{where}.deepspeed", value, f"a mapping, or a DeepSpeed JSON file (relative to the plan) holding an object: {why}"))
            del settings["deepspeed"]  # reported here; the schema would report the path again
        else:
            settings["deepspeed"] = block
    return problems


def _zero_stage_from_block(settings: dict[str, Any]) -> None:
    """A deepspeed block that sets zero_optimization.stage (a pasted ds_z3_config.json) gives the
    zero_stage when the plan sets none; when both are set, they must agree (ds_config checks it, and
    reports a stage that is no ZeRO stage at the block's key)."""
    block = settings.get("deepspeed")
    zero = block.get("zero_optimization") if isinstance(block, dict) else None
    if isinstance(zero, dict) and zero.get("stage") in (0, 1, 2, 3):
        settings.setdefault("zero_stage", zero["stage"])




def _resolve_paths(plan: Plan, base_dir: Path) -> Plan:
    """Make file paths absolute so the worker finds them from any directory."""

    def absolute(p: str) -> str:
        return str((base_dir / p).resolve())

    def data(spec: DataSpec) -> DataSpec:
        sources = [source.model_copy(update={"files": expand_files(source.files, base_dir)}) for source in spec.sources]
        return spec.model_copy(update={"files": expand_files(spec.files, base_dir), "sources": sources})

    phases = []
    for phase in plan.phases:
        if isinstance(phase.data, MultistepData):
            new_data = phase.data.model_copy(update={"pretrain": data(phase.data.pretrain), "finetune": data(phase.data.finetune)})
        else:
            new_data = data(phase.data)
        phases.append(phase.model_copy(update={"data": new_data}))
    cluster = plan.cluster
    if cluster.hostfile is not None:
        cluster = cluster.model_copy(update={"hostfile": absolute(cluster.hostfile)})
    return plan.model_copy(update={"phases": phases, "cluster": cluster, "cache_dir": str(_cache_dir(plan, base_dir))})


def _cache_dir(plan: Plan, base_dir: Path) -> Path:
    """The plan's cache_dir made absolute (relative to the plan), or the default one."""
    return (base_dir / os.path.expanduser(plan.cache_dir)).resolve() if plan.cache_dir else default_cache_dir()


def load_plan(path: str | Path, file_problem: FileProblem | None = None) -> Plan:
    """Read and validate a plan file; raises PlanError listing every problem (see parse_plan)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError([("<file>", str(path), "an existing plan file")])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PlanError([("<file>", str(path), f"valid YAML ({error})")]) from None
    return parse_plan(raw, path.parent, file_problem)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/harness (~/.cache/harness): token stores unless the plan names a cache_dir,
    and the secrets files of pdsh launches."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness"
