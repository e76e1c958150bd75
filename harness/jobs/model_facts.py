"""`python -m harness.jobs.model_facts '<FactsRequest JSON>'`: prints ModelFacts as JSON,
what the launch side's checks need of the plan's model and tokenizer (harness/stages/model_fit.py):

- the tokenizer, loaded as the ranks load it (or why it does not load);
- the model's architecture, built on the meta device (no weight read or allocated): its embedding
  rows, max_position_embeddings, what kind of positions it has, and its parameter table
  (harness/jobs/param_table.py table_of), with exactly the names of `named_parameters()` on the
  ranks (a stage with an adapter asks param_table.py for the table with it applied);
- the first rows of each data set asked about, encoded by its objective and laid out by its rank
  side (the same code the store builder and the ranks run): a row whose rendering trains no token,
  or a trained turn whose end gets no loss, is named with its file and line.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from harness.jobs.param_table import table_of
from harness.objectives import OBJECTIVES, DataProblem, RowProblem, samples
from harness.stages.model_fit import FactsRequest, ModelFacts, RowsCheck
from harness.worker.data import IGNORE_INDEX
from harness.worker.model import architecture, load_tokenizer
from harness.worker.objectives import RANK_OBJECTIVES

ROWS = 200
"""Rows read from the start of each data file."""


def positions_of(model) -> str:
    """learned: an nn.Embedding besides the token embeddings sized by max_position_embeddings (GPT-2's
    wpe; OPT's has 2 extra rows); rotary: a rotary embedding module; other: neither (ALiBi, none)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    tokens = model.get_input_embeddings()
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not tokens]
    if limit and any(limit <= m.num_embeddings <= limit + 2 for m in embeddings):
        return "learned"
    return "rotary" if any("rotary" in type(m).__name__.lower() for m in model.modules()) else "other"


def rope_of(config) -> str | None:
    """transformers 5's rope_parameters in words: "rope_type 'default' (no scaling)", "rope_type 'yarn', factor 4.0"."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return "rope_type 'default' (no scaling)"
    details = ", ".join(f"{key} {rope[key]}" for key in ("factor", "original_max_position_embeddings") if key in rope)
    return f"rope_type '{kind}'" + (f", {details}" if details else "")


class RowsInMemory:
    """Encoded rows as a token store's reading side (harness/worker/data.py TokenStore) offers them."""

    def __init__(self, rows: list[tuple[list[int], list[int] | None]]):
        self.rows = [(np.array(ids, np.int64), np.array(mask if mask is not None else [1] * len(ids), np.uint8)) for ids, mask in rows]
        self.meta = SimpleNamespace(rows=len(rows), tokens=sum(len(ids) for ids, _ in rows))

    def row(self, r: int) -> np.ndarray:
        return self.rows[r][0]

    def row_with_mask(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rows[r]


def rows_problems(check: RowsCheck, tokenizer) -> list[tuple[str, str, str]]:
    """(plan field, file, what is allowed) for the first failing row of each file of the data set."""
    objective, rank = OBJECTIVES[check.kind], RANK_OBJECTIVES[check.kind]
    problems = []
    for k, file in enumerate(check.data.files):
        rows = samples.first_rows(file, check.data, ROWS)
        if not rows:
            continue
        columns = list(dict.fromkeys(column for _, row in rows for column in row))
        try:
            encoded = objective.encoder(check.data, tokenizer)({c: [row.get(c) for _, row in rows] for c in columns}, 1)
        except (DataProblem, RowProblem) as problem:  # RowProblem: a template whose renderings of a conversation's turns disagree
            problems.append((f"{check.where}.files[{k}]", file, f"rows the tokenizer renders ({problem})"))
            continue
        # A sample may be several store rows (a preference pair: chosen, rejected); labels one per store row.
        per_sample = objective.rows_per_sample
        laid_out = rank.samples(RowsInMemory(encoded), check.data, check.seq_len, tokenizer.pad_token_id).eval_arrays(
            np.arange(len(encoded) // per_sample))
        labels = np.asarray(laid_out["labels"]).reshape(len(encoded), -1)
        for r, ((ids, mask), row_labels) in enumerate(zip(encoded, labels)):
            why = row_problem(np.array(ids), np.array(mask), row_labels, check.seq_len, tokenizer)
            if why:
                problems.append((f"{check.where}.files[{k}]", file, f"{why} ({rows[r // per_sample][0]} of the file)"))
                break
    return problems


def row_problem(ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, seq_len: int, tokenizer) -> str | None:
    """What is wrong with one encoded row (mask: 1 a trained turn's content, 2 its end) as the ranks
    lay it out (labels, IGNORE_INDEX where no loss), or None."""
    if not mask.any():
        return ("rows whose rendering trains at least one token (this one trains none: the template renders no assistant "
                "content where the loss goes); use a chat template that renders each assistant turn")
    if not (labels != IGNORE_INDEX).any():
        return None  # its trained tokens lie past seq_len: a long row, which data may hold (as before this check)
    turn_ends = np.flatnonzero((mask != 0) & (np.append(mask[1:], 0) == 0))  # the last trained token of each turn
    unclosed = [int(end) for end in turn_ends if mask[end] != 2]
    if unclosed:
        return ("every trained turn closed by an end-of-turn token that is trained (the chat template closes a turn with nothing "
                f"after its content, at token {unclosed[0]}: the model would never learn to stop); use a template that ends each "
                "assistant turn, e.g. with the tokenizer's eos_token")
    dropped = [int(p) for p in np.flatnonzero(mask[:seq_len] == 2) if labels[p] != ids[p]]
    if dropped:
        token = tokenizer.convert_ids_to_tokens(int(ids[dropped[0]]))
        same = " (it is also the pad token)" if ids[dropped[0]] == tokenizer.pad_token_id else ""
        return f"the end of each turn in the loss: {token!r}{same} at position {dropped[0]} gets no label when laid out"
    return None


def model_facts(request: FactsRequest) -> ModelFacts:
    spec = request.model
    try:
        tokenizer = load_tokenizer(spec.tokenizer)
    except Exception as error:  # transformers raises many types for a folder that is not a tokenizer
        return ModelFacts(tokenizer_problem=_said(error))
    try:
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(architecture(spec, tokenizer))
        model.tie_weights()  # as the worker builds it: a tied head is one parameter, the embeddings'
    except Exception as error:
        return ModelFacts(tokenizer_len=len(tokenizer), model_problem=_said(error))
    rows = model.get_input_embeddings().num_embeddings
    facts: dict[str, Any] = {"tokenizer_len": len(tokenizer), "embedding_rows": rows, "positions": positions_of(model),
                             "max_positions": getattr(model.config, "max_position_embeddings", None), "rope": rope_of(model.config)}
    if spec.resize_embeddings and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the shapes the ranks train (no values on meta)
    problems = [problem for check in request.rows for problem in rows_problems(check, tokenizer)]
    return ModelFacts(**facts, params=table_of(model), row_problems=problems)


def _said(error: Exception) -> str:
    return " | ".join(line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip())[:400]


def main() -> None:
    print(model_facts(FactsRequest.model_validate_json(sys.argv[1])).model_dump_json())


if __name__ == "__main__":
    main()
