"""Does the plan's model fit its tokenizer, its seq_len and its data? Pure rules on the facts a
child process reports (harness/jobs/model_facts.py: it loads the tokenizer and builds the model's
architecture on the meta device, so the launch side never imports transformers), checked before
anything is written:

- the tokenizer loads at all;
- it has no more tokens than the model has embedding rows (an id past them fails in the first
  forward), unless model.resize_embeddings: then the first stage adds the rows (EmbeddingResize);
- seq_len is within max_position_embeddings: an error for learned absolute positions (GPT-2:
  there is no position embedding past them), a warning for rotary ones (they extrapolate, untested);
- the first rows of each data set whose objective has a loss mask, rendered and laid out as the
  ranks lay them out, each train a token and train every turn's end (an end-of-turn
  token that is also the pad token included).

The facts are cached in <cache_dir>/facts/ under a key of everything they depend on (`facts_key`),
so `harness plan` pays for the child once per model, tokenizer and data.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from harness.objectives import OBJECTIVES
from harness.plan import DataSpec, ModelSpec, MultistepData, Plan, Problem
from harness.records import EmbeddingResize, Record
from harness.records.token_store import tokenizer_id
from harness.stages.params import ParamTable
from harness.stages.stage import Stage
from harness.stages.stores import store_key

FACTS_CODE = [Path(__file__).parents[1] / "jobs" / name for name in ("model_facts.py", "param_table.py")]
"""The child's own code is part of the facts' key: facts cached by another version of it are found anew
(a parameter table without a field a later version adds would resolve adapters to nothing)."""


class RowsCheck(BaseModel):
    """First rows of one data set to render and lay out as the ranks will."""

    model_config = ConfigDict(frozen=True)

    where: str
    """The plan field of the data set, e.g. phases[1].data."""
    kind: str
    data: DataSpec
    seq_len: int
    """The smallest seq_len of the stages that read it."""


class FactsRequest(BaseModel):
    """What the facts child is asked (JSON on its stdin)."""

    model: ModelSpec
    rows: list[RowsCheck] = []


class ModelFacts(Record):
    """What the facts child found (harness/jobs/model_facts.py). A problem loading the tokenizer or
    building the model leaves the fields after it None."""

    tokenizer_problem: str | None = None
    model_problem: str | None = None
    tokenizer_len: int | None = None
    embedding_rows: int | None = None
    """Rows of the model's input embeddings as its config builds them (before any resize)."""
    max_positions: int | None = None
    """config.max_position_embeddings (GPT-2's n_positions), when the config has one."""
    positions: Literal["learned", "rotary", "other"] | None = None
    """learned: absolute position embeddings (no row past max_positions); rotary: RoPE; other: none or another kind."""
    rope: str | None = None
    """The rotary scaling, as config.rope_parameters says it ("rope_type 'default' (no scaling)")."""
    params: ParamTable | None = None
    """The parameters as the ranks will see them (embeddings resized when the plan asks)."""
    row_problems: list[tuple[str, str, str]] = []
    """(plan field, file, what is allowed) of the first rows that fail a check."""


def facts_request(plan: Plan) -> FactsRequest:
    """The model, and the first rows to check of each data set whose objective has a loss mask."""
    rows = []
    for i, phase in enumerate(plan.phases):
        seq_len = min([phase.seq_len] + [phase.stage_settings(j).seq_len for j in range(len(phase.stages))])
        sets = [(f"data.{kind}", kind, getattr(phase.data, kind)) for kind in ("pretrain", "finetune")] \
            if isinstance(phase.data, MultistepData) else [("data", phase.kind, phase.data)]
        rows += [RowsCheck(where=f"phases[{i}].{where}", kind=kind, data=spec, seq_len=seq_len)
                 for where, kind, spec in sets if OBJECTIVES[kind].loss_mask and spec.files]
    return FactsRequest(model=plan.model, rows=rows)


def facts_key(request: FactsRequest) -> str:
    """Everything the facts depend on: the child's code, the model (its config.json), the tokenizer's
    files, each checked data set as its token store's key (inputs, columns, tokenizer) and its seq_len."""
    model = request.model
    config = hashlib.sha256((Path(model.path) / "config.json").read_bytes()).hexdigest() if model.path else model.builtin
    code = hashlib.sha256(b"".join(path.read_bytes() for path in FACTS_CODE)).hexdigest()
    parts = [code, model.model_dump(mode="json"), config, tokenizer_id(model.tokenizer),
             [[check.where, store_key(check.kind, check.data, model.tokenizer), check.seq_len] for check in request.rows]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def facts_problems(facts: ModelFacts, model: ModelSpec) -> list[Problem]:
    """What keeps the model or tokenizer from being used at all, and the rows that fail."""
    problems = []
    if facts.tokenizer_problem:
        problems.append(("model.tokenizer", model.tokenizer, f"a folder or hub id that loads as a tokenizer (it does not: {facts.tokenizer_problem})"))
    if facts.model_problem:
        problems.append(("model.path" if model.path else "model.builtin", model.path or model.builtin,
                         f"a model transformers builds from its config (it does not: {facts.model_problem})"))
    return problems + [tuple(problem) for problem in facts.row_problems]


def fit_stages(stages: list[Stage], fields: list[str], facts: ModelFacts) -> tuple[list[Stage], list[Problem], list[str]]:
    """(the stages, the first one with the embedding resize it carries out; problems; one-line
    warnings) of the plan's model against its tokenizer and each stage's seq_len. fields: the
    plan block of each stage (expand.stage_fields)."""
    problems, warnings = [], []
    model = stages[0].model
    tokens, rows = facts.tokenizer_len, facts.embedding_rows
    if tokens is not None and rows is not None and tokens > rows:
        if model.resize_embeddings:
            resize = EmbeddingResize(rows_before=rows, rows_after=tokens)
            stages = [stages[0].model_copy(update={"embedding_resize": resize}), *stages[1:]]
        else:
            problems.append(("model.tokenizer", model.tokenizer,
                             f"a tokenizer of at most {rows} tokens, the model's embedding rows (config vocab_size); this one has {tokens} "
                             f"(ids {rows}..{tokens - 1} would fail in the first forward): set model.resize_embeddings: true to add "
                             f"{tokens - rows} rows (started as transformers' resize_token_embeddings(mean_resizing=True) does), "
                             "or use the model's own tokenizer"))
    limit = facts.max_positions
    for stage, field in zip(stages, fields):
        seq_len = stage.settings.seq_len
        if limit is None or seq_len <= limit:
            continue
        if facts.positions == "learned":
            problems.append((f"{field}.seq_len", seq_len, f"at most {limit}, the model's max_position_embeddings: it learned one position "
                                                          "embedding per position and has none past them"))
        else:
            kind = f"rotary positions, {facts.rope}" if facts.positions == "rotary" else "positions"
            warnings.append(f"{field}.seq_len {seq_len} is above the model's max_position_embeddings {limit}: its {kind}; beyond "
                            f"{limit} they extrapolate untested (set rope scaling in the model's config, or seq_len <= {limit})")
    return stages, problems, list(dict.fromkeys(warnings))
