"""Weighted mixtures as `harness plan` shows them: per phase and mixture, each source's share, its
training samples (counted from its store when built, else estimated from its files), the samples
the phase's steps draw from it and the epochs that makes; and the warning for a source expected to
repeat while data.exhausted is unset."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from harness.objectives import OBJECTIVES, count_rows
from harness.records.token_store import META, StoreMeta, StoreRequest
from harness.stages import Stage, eval_size, stage_stores
from harness.stages.mixture import Mixture

SUBWORD_BYTES_PER_TOKEN = 4  # about, for English text: an estimate until the store is built


def train_samples(kind: str, request: StoreRequest, seq_len: int) -> tuple[int | None, bool]:
    """(training samples of one source, exact?): rows counted from the files, blocks from the store
    when it is built, else estimated from the input's size; None for a hub set not yet tokenized."""
    spec = request.data
    if OBJECTIVES[kind].samples_are_rows and spec.hub is None:
        n, exact = count_rows(spec), True
    elif (request.folder / META).is_file():
        n, exact = StoreMeta.read(request.folder).tokens // seq_len, True
    elif spec.hub is None:
        size = sum(os.stat(f).st_size for f in spec.files)
        n, exact = size // (1 if request.tokenizer == "bytes" else SUBWORD_BYTES_PER_TOKEN) // seq_len, False
    else:
        return None, False
    return n - eval_size(n, spec), exact


def phase_mixtures(stages: list[Stage]) -> list[dict]:
    """One row per source of every mixture a phase draws from, with what the phase's steps take of it."""
    rows = []
    for phase in dict.fromkeys(stage.phase for stage in stages):
        members = [stage for stage in stages if stage.phase == phase]
        first = members[0]
        for kind, plan in first.data.mixes.items():
            draws = sum(stage.global_batch * sum(stage.data.source_at(s) == kind for s in range(1, stage.steps + 1)) for stage in members)
            drawn = Mixture(plan).drawn(draws)
            for k, request in enumerate(stage_stores(first)[kind]):
                n, exact = train_samples(kind, request, first.settings.seq_len)
                rows.append({"phase": phase, "data": kind, "source": k, "inputs": request.data.hub or ", ".join(map(os.path.basename, request.data.files)),
                             "share": plan.quotas[k] / plan.cycle, "train_samples": n, "exact": exact, "drawn": int(drawn[k]),
                             "epochs": drawn[k] / n if n else None, "exhausted": plan.exhausted, "set": first.data.sets[kind].exhausted})
    return rows


def mixture_warnings(stages: list[Stage]) -> list[str]:
    """A line per source expected to start a second epoch while data.exhausted is unset."""
    return [f"warning: phase '{row['phase']}' draws about {row['epochs']:.2f} epochs of {row['data']} source {row['source']} "
            f"({row['inputs']}): it repeats (data.exhausted unset: repeat); set data.exhausted: repeat to say so, or stop to end "
            "the phase before a source repeats" for row in phase_mixtures(stages) if row["set"] is None and (row["epochs"] or 0) > 1]


def print_mixtures(stages: list[Stage]) -> None:
    """The table of every mixture's sources, then the warnings."""
    rows = phase_mixtures(stages)
    if not rows:
        return
    table = Table(title="data mixtures: what each phase's steps draw from each source")
    for column in ("phase", "data", "source", "inputs", "share", "train samples", "drawn", "epochs", "exhausted"):
        table.add_column(column)
    for row in rows:
        samples = "?" if row["train_samples"] is None else f"{'' if row['exact'] else '~'}{row['train_samples']:,}"
        epochs = "?" if row["epochs"] is None else f"{'' if row['exact'] else '~'}{row['epochs']:.2f}"
        table.add_row(row["phase"], row["data"], str(row["source"]), row["inputs"], f"{row['share']:.4f}", samples, f"{row['drawn']:,}", epochs,
                      row["exhausted"])
    Console(width=200).print(table)
    for line in mixture_warnings(stages):
        print(line)
