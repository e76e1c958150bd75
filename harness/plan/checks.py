"""Rules of a plan beyond its schema that need its files: the hostfile, multistep stages merged
over their phase, the phase's length, and its data files (they exist, and a sample of each reads
as the phase's kind needs: the check is given by the caller, see harness/objectives)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from harness.plan.cluster import ClusterSpec
from harness.plan.data import DataSpec, MultistepData
from harness.plan.errors import Problem, problems_from
from harness.plan.hostfile import hostfile_problems
from harness.plan.phases import PhaseSpec

FileProblem = Callable[[str, DataSpec, str], "str | None"]
"""(data file, its data set, the kind of rows it holds) -> what is wrong with it, or None."""


def check_cluster(cluster: ClusterSpec, base_dir: Path) -> list[Problem]:
    """Cluster settings that cannot work: pdsh without hosts, a hostfile DeepSpeed would refuse.
    (Several nodes on the local launcher, a phase's own nodes included, are found with the stages.)"""
    problems = []
    if cluster.launcher == "pdsh" and not (cluster.hostfile or cluster.hosts):
        problems.append(("cluster.launcher", cluster.launcher, "pdsh starts ranks on the hosts it is given: set cluster.hostfile or cluster.hosts"))
    if cluster.hostfile is not None:
        problems += [("cluster.hostfile", cluster.hostfile, why) for why in hostfile_problems(base_dir / cluster.hostfile)]
    return problems


def check_phase(i: int, phase: PhaseSpec, base_dir: Path, file_problem: FileProblem | None) -> list[Problem]:
    """Rules of a phase beyond its schema: each multistep stage merged over the phase, the length,
    the data files (they exist, and, with file_problem, a sample of each reads as the phase's kind needs)."""
    problems = []
    for j in range(len(phase.stages)):
        try:
            phase.stage_settings(j)
        except ValidationError as error:
            problems += problems_from(error, f"phases[{i}].stages[{j}]", phase.stage_input(j))
    if phase.kind == "pretrain" and phase.epochs is not None:
        problems.append((f"phases[{i}].epochs", phase.epochs, "pretrain phases take steps or tokens (packed blocks are counted only after tokenizing)"))
    if phase.kind != "multistep":
        given = [k for k in ("steps", "epochs", "tokens") if getattr(phase, k) is not None]
        if len(given) != 1:
            problems.append((f"phases[{i}]", given, "give exactly one of steps, epochs, tokens"))
    problems += _preference_problems(i, phase)
    for where, kind, spec in _data_specs(phase):
        if spec.packing and kind == "pretrain":
            problems.append((f"phases[{i}].{where}.packing", True, "false for pretrain data: pretrain blocks are always packed (documents "
                             "end to end, seq_len tokens a block, no padding); packing lays fine-tune rows end to end"))
        for k, pattern in enumerate(spec.files):  # a mixture's sources each come as a data set of their own
            files = expand_files([pattern], base_dir)
            if not files:
                problems.append((f"phases[{i}].{where}.files[{k}]", pattern, "an existing file, or a glob that matches files"))
            for file in files if file_problem is not None and _rows_fit(kind, spec) else ():
                why = file_problem(file, spec, kind)
                if why is not None:
                    problems.append((f"phases[{i}].{where}.files[{k}]", file, why))
    return problems


def _preference_problems(i: int, phase: PhaseSpec) -> list[Problem]:
    """Preference settings and rows only where a preference phase reads them; no packing there."""
    problems = []
    if phase.kind != "preference" and "preference" in phase.model_fields_set:
        problems.append((f"phases[{i}].preference", phase.preference.model_dump(exclude_none=True),
                         f"a block of preference phases only (kind: preference); this phase is {phase.kind}"))
    for j, stage in enumerate(phase.stages):
        if stage.preference is not None:
            problems.append((f"phases[{i}].stages[{j}].preference", stage.preference.model_dump(exclude_none=True),
                             "a block of preference phases only (kind: preference); a multistep stage trains pretrain and finetune data"))
    if phase.kind == "preference" and phase.data.sources:  # the reference log-probabilities are kept per store
        problems.append((f"phases[{i}].data.sources", len(phase.data.sources), "files or hub: a preference phase reads one data set "
                         "(weighted mixtures are for pretrain and finetune data)"))
    for where, kind, spec in _data_specs(phase):
        if not _rows_fit(kind, spec) and kind == "preference":
            problems.append((f"phases[{i}].{where}.rows", spec.rows, "preference (or unset): a preference phase reads pairs of a chosen "
                             "and a rejected response; prompt_response, alpaca and chat rows train a finetune phase"))
        elif not _rows_fit(kind, spec):
            problems.append((f"phases[{i}].{where}.rows", spec.rows, f"prompt_response, alpaca or chat for {kind} data: "
                             "preference rows train a phase of kind preference"))
        if kind == "preference" and spec.packing:
            problems.append((f"phases[{i}].{where}.packing", spec.packing, "false for preference rows: a pair's chosen and rejected "
                             "responses go through one forward as two padded rows"))
    return problems


def _rows_fit(kind: str, spec: DataSpec) -> bool:
    """Preference rows (given, or left unset) for preference data, and only there."""
    if kind == "preference":
        return "rows" not in spec.model_fields_set or spec.rows == "preference"
    return spec.rows != "preference"


def _data_specs(phase: PhaseSpec) -> list[tuple[str, str, DataSpec]]:
    """(field path in the phase, kind of rows, data set) of each data set of a phase; a mixture's
    sources one by one ('data.sources[1]')."""
    if isinstance(phase.data, MultistepData):
        sides = [("data.pretrain", "pretrain", phase.data.pretrain), ("data.finetune", "finetune", phase.data.finetune)]
    else:
        sides = [("data", phase.kind, phase.data)]
    return [(f"{where}.sources[{k}]" if spec.sources else where, kind, one)
            for where, kind, spec in sides for k, (one, _) in enumerate(spec.weighted_sets())]


def expand_files(patterns: list[str], base_dir: Path) -> list[str]:
    """Absolute paths of the files the patterns name; a glob expands in sorted order."""
    files = []
    for pattern in patterns:
        path = str(base_dir / os.path.expanduser(pattern))
        matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
        files += [str(Path(m).resolve()) for m in matches if os.path.isfile(m)]
    return files


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be a folder this user writes into (or creates), or None: the nearest
    existing part of it must be a folder that is writable."""
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if not nearest.is_dir():
        return f"a folder, or a path where one can be created ({nearest} is a file)"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"a folder you can write, or a path where you can create one ({nearest} is not writable)"
    return None
