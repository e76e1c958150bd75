"""What the user wrote: the plan schema (one block per file), its field types, its problems, and
loading a plan file with every check that needs only the plan and its files. The bottom layer:
imports nothing else of the harness, and never torch.

    fields.py        the strict base model, injection-safe field types, the secrets rule
    model.py         model: which model trains (and its tokenizer)
    cluster.py       cluster, slurm, wandb: where it runs and what it reports to
    data.py          data: one data set, or multistep's pair
    training.py      every training setting of a phase or multistep stage
    trainable.py     which parameters train: selectors, lr groups, adapters
    phases.py        phases and the plan itself
    errors.py        PlanError: every problem at once, each with field, value and what is allowed
    load.py          YAML -> Plan; checks.py, hostfile.py, model_source.py what it checks besides
"""
from harness.plan.checks import FileProblem, expand_files, folder_problem
from harness.plan.cluster import ClusterSpec, SlurmSpec, WandbSpec
from harness.plan.data import MIX_CYCLE, DataSource, DataSpec, MixSpec, MultistepData
from harness.plan.errors import PlanError, Problem
from harness.plan.fields import NAME_PATTERN, Strict, is_secret
from harness.plan.load import default_cache_dir, load_plan, parse_plan
from harness.plan.model import BUILTIN_CONFIGS, BYTE_VOCAB, ModelSpec
from harness.plan.model_source import TOKENIZER_FILES
from harness.plan.phases import OBJECTIVE_KINDS, PhaseSpec, Plan, StageSettings, deep_merge
from harness.plan.trainable import ALL_LINEAR, LAYER_RANGE, AdapterSpec, TrainableSpec
from harness.plan.training import (CPU_UNSUPPORTED_OPTIMIZERS, FastParts, MetricName, OffloadSpec, OptimizerSpec,
                                   PreferenceSpec, RegularizationSpec, SchedulerSpec, TrainSettings)

__all__ = [
    "ALL_LINEAR", "AdapterSpec", "BUILTIN_CONFIGS", "BYTE_VOCAB", "CPU_UNSUPPORTED_OPTIMIZERS", "OBJECTIVE_KINDS", "LAYER_RANGE", "NAME_PATTERN", "TOKENIZER_FILES", "ClusterSpec", "DataSpec",
    "DataSource", "FastParts", "FileProblem", "MIX_CYCLE", "MetricName", "MixSpec", "ModelSpec", "MultistepData", "OffloadSpec", "OptimizerSpec", "PhaseSpec",
    "PreferenceSpec",
    "Plan", "PlanError", "Problem", "RegularizationSpec", "SchedulerSpec", "SlurmSpec", "StageSettings", "Strict", "TrainSettings",
    "TrainableSpec", "WandbSpec", "default_cache_dir", "deep_merge", "expand_files", "folder_problem", "is_secret", "load_plan", "parse_plan",
]
