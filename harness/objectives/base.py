"""The launch-side half of an objective (what a phase optimizes): the rows it reads and checks,
how they become token-store records, and the metric columns it adds. Its rank-side twin
(harness/worker/objectives/) builds batches from those records, computes the loss and the eval
metrics. No torch: `harness plan` and the store builder call these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from harness.plan import DataSpec, TrainSettings

# A batch of rows (dict column -> list) and the number of its first row (1-based, for messages)
# -> per row, its token ids and its loss mask (None for objectives whose stores have none).
RowEncoder = Callable[[dict[str, list], int], list[tuple[list[int], list[int] | None]]]


class DataProblem(Exception):
    """The data cannot be tokenized as the plan describes it (the store builder exits 2 with it)."""


class RowProblem(ValueError):
    """A row that does not read as its shape: what was expected, and what the row holds instead."""

    def __init__(self, expected: str, found: str):
        super().__init__(f"{expected} ({found})")
        self.expected, self.found = expected, found


class Objective:
    """One objective, launch side. Subclasses set the class facts and implement the methods."""

    kind: ClassVar[str]
    """The phase kind that trains it, and the kind of the token stores it reads."""
    label: ClassVar[str]
    """How messages name its data ('fine-tune')."""
    samples_are_rows: ClassVar[bool]
    """A sample is one stored row (epochs count rows, a global batch needs that many rows); else it
    is a block of seq_len tokens of the packed stream, counted only after tokenizing."""
    loss_mask: ClassVar[bool]
    """Its store rows carry a loss mask per token (loss_mask.bin)."""
    metric_prefix: ClassVar[str]
    """eval/<prefix>_loss and eval/<prefix>_ppl name its held-out loss beside other data sets'."""
    rows_per_sample: ClassVar[int] = 1
    """Rows one sample puts through the forward (a preference pair: its chosen and rejected row), so
    a micro batch of samples costs that many rows of activations (harness/stages/memory.py)."""
    perplexity: ClassVar[bool] = True
    """Its held-out loss is a mean token negative log-likelihood, so exp(loss) is a perplexity."""

    def required_columns(self, spec: DataSpec) -> list[str]:
        """The columns every row must have."""
        raise NotImplementedError

    def structured_rows(self, spec: DataSpec) -> bool:
        """Whether rows hold more than text columns (message lists): then no plain text file can hold
        them, and a parquet file's rows are read to check them."""
        return False

    def row_problem(self, row: dict[str, Any], spec: DataSpec) -> RowProblem | None:
        """What keeps one row (a dict of columns) from being trained on; None if nothing."""
        for column in self.required_columns(spec):
            if column not in row:
                return RowProblem(f"rows with a column {column!r}", f"has none; its columns: {sorted(row)}{self.shape_hint(row)}")
            if not isinstance(row[column], str):
                return RowProblem(f"text in column {column!r}", f"holds {row[column]!r}")
        return None

    def shape_hint(self, row: dict[str, Any]) -> str:
        """A hint appended when a row lacks a column: which setting would read it."""
        return ""

    def key_fields(self, spec: DataSpec) -> list:
        """What shapes a row's tokens besides the input files and the tokenizer (part of the store key)."""
        raise NotImplementedError

    def encoder(self, spec: DataSpec, tokenizer) -> RowEncoder:
        """How a batch of rows becomes store rows, with the tokenizer the store builder loaded."""
        raise NotImplementedError

    def packs_rows(self, spec: DataSpec) -> bool:
        """Whether its rows are laid end to end in one sequence per micro batch (data.packing)."""
        return False

    def eval_keys(self, settings: TrainSettings) -> list[str]:
        """The eval/ keys it reports besides the held-out loss and perplexity (report columns)."""
        return []

    def stage_notes(self, settings: TrainSettings, precision: str, store: Path, start_digest: str | None, spec: DataSpec) -> list[str]:
        """Lines `harness plan` prints under an unfinished stage that trains it on the data set spec.
        store: its token store's folder; start_digest: the digest of the weights the stage starts
        from, when the launch side knows it."""
        return []

    def built_store_problems(self, store: Path, settings: TrainSettings) -> list[tuple[int, str, str]]:
        """What keeps a built store's samples from training at these settings, found before anything
        is written or launched: (sample number, what is expected, what it has)."""
        return []


def text_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of each text, without special tokens, through the fast tokenizer's batch encoder."""
    encoder = tokenizer.backend_tokenizer
    return lambda texts: [e.ids for e in encoder.encode_batch(texts, add_special_tokens=False)]
