"""Data files read without tokenizing: does a file read as the plan says (checked on a bounded
sample before anything is written), and how many rows it has.

The token-store builder (harness/jobs/store_builder.py) reads every row later and stops at the
first one it cannot use, naming only its row number. These checks run when the plan loads and name
the file and line of the common mistakes: an empty file, a JSON line that does not parse, a row
without the column the phase needs (or with no text in it), a chat row with a role the template
does not know or no assistant turn (each objective says what its rows need). Only the first
SAMPLE_LINES rows (at most SAMPLE_BYTES) of a text, JSON Lines or JSON array file are read, through
the decompressor of a .gz, .bz2 or .xz file, and of a parquet file its metadata (and, for rows that
hold message lists, its first rows). Launch side: no torch, no datasets.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zlib

from harness.objectives.base import Objective
from harness.plan import DataSpec, PlanError

SAMPLE_LINES = 1000
SAMPLE_BYTES = 1 << 20  # and at most this much of each file: a line can be long
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# The one column Hugging Face datasets' text loader gives a text file.
TEXT_COLUMN = "text"


def file_problem(path: str, spec: DataSpec, objective: Objective) -> str | None:
    """What is wrong with one data file of a data set whose rows the objective reads; None when its
    sample reads well."""
    fmt = spec.resolved_format()
    if fmt == "parquet":
        return _parquet_problem(path, spec, objective)
    suffix = os.path.splitext(path)[1]
    if suffix == ".zst":
        return None  # zstandard is not in the standard library; the builder reads it
    try:
        with OPENERS.get(suffix, open)(path, "rb") as f:
            data = f.read(SAMPLE_BYTES)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        return f"a readable file ({error})"
    whole = len(data) < SAMPLE_BYTES
    if whole and not data.strip():
        return "a file with rows (this one is empty)"
    try:
        text = data.decode("utf-8") if whole else data[: data.rfind(b"\n") + 1].decode("utf-8")  # the last line may be cut
    except UnicodeDecodeError as error:
        return f"UTF-8 text (line {_line_of(data, error.start)} is not: {error.reason} at byte {error.start})"
    if fmt == "text":
        if objective.structured_rows(spec):
            return f"rows of shape {spec.rows!r} (a text file has one column, {TEXT_COLUMN!r}: use json or parquet files)"
        missing = [column for column in objective.required_columns(spec) if column != TEXT_COLUMN]
        return f"a column {missing[0]!r} (a text file has one, {TEXT_COLUMN!r}: use json or parquet files)" if missing else None
    rows = _json_array_rows(text, whole) if text.lstrip().startswith("[") else _json_lines_rows(text)
    if isinstance(rows, str):
        return rows
    for where, row in rows:
        problem = objective.row_problem(row, spec)
        if problem is not None:
            return f"{problem.expected} ({where} {problem.found})"
    return None


def is_json_array(path: str) -> bool:
    """Whether a JSON file is one array of rows (as alpaca_data.json is) rather than JSON Lines."""
    with OPENERS.get(os.path.splitext(path)[1], open)(path, "rb") as f:
        return f.read(SAMPLE_BYTES).lstrip()[:1] == b"["


def _json_lines_rows(text: str) -> list[tuple[str, dict]] | str:
    """('line N', row) of the sample's JSON Lines, or what is wrong. A file that opens with a lone
    '{' is one JSON document instead, which the builder reads whole: nothing to check here."""
    lines = [(n, line) for n, line in enumerate(text.split("\n")[:SAMPLE_LINES], 1) if line.strip()]
    if not lines or lines[0][1].strip() == "{":
        return []
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"JSON Lines, one object per line (line {n} is not valid JSON: {error.msg} at column {error.colno})"
        if not isinstance(row, dict):
            return f"JSON Lines, one object per line (line {n} holds a {type(row).__name__})"
        rows.append((f"line {n}", row))
    return rows


def _json_array_rows(text: str, whole: bool) -> list[tuple[str, dict]] | str:
    """('row K (line N)', row) of the first rows of a JSON array, or what is wrong with them. When the
    sample is only the start of the file, the row cut at its end is not a problem."""
    decoder = json.JSONDecoder()
    rows, at = [], text.index("[") + 1
    while len(rows) < SAMPLE_LINES:
        at = _skip_space(text, at)
        if at < len(text) and text[at] == "]" and not rows:
            return "a JSON array with rows (this one is empty)"
        line = _line_of(text, at)
        try:
            row, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            if not whole and (error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")):
                break  # the sample ends inside this row
            return f"a JSON array of row objects (row {len(rows) + 1} at line {line} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno})"
        if not isinstance(row, dict):
            return f"a JSON array of row objects (row {len(rows) + 1} at line {line} holds a {type(row).__name__})"
        rows.append((f"row {len(rows) + 1} (line {line})", row))
        at = _skip_space(text, at)
        if at < len(text) and text[at] == "]":
            break
        if at < len(text) and text[at] != ",":
            return f"a JSON array of row objects (a ',' or ']' after row {len(rows)}, line {_line_of(text, at)}, not {text[at]!r})"
        at += 1
    return rows


def _line_of(text: str | bytes, at: int) -> int:
    """The 1-based line of position `at`."""
    return text.count("\n" if isinstance(text, str) else b"\n", 0, at) + 1


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _parquet_problem(path: str, spec: DataSpec, objective: Objective) -> str | None:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        return f"a parquet file ({error})"
    if parquet.metadata.num_rows == 0:
        return "a file with rows (this one has none)"
    schema = parquet.schema_arrow
    for column in objective.required_columns(spec):
        if column not in schema.names:
            return f"a column {column!r} (its columns: {schema.names})"
        column_type = schema.field(column).type
        if not objective.structured_rows(spec) and not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
            return f"text in column {column!r} (it holds {column_type})"
    if objective.structured_rows(spec):  # nested columns: read the first rows
        batch = next(parquet.iter_batches(batch_size=SAMPLE_LINES), None)
        for k, row in enumerate(batch.to_pylist() if batch is not None else [], 1):
            problem = objective.row_problem(row, spec)
            if problem is not None:
                return f"{problem.expected} (row {k} {problem.found})"
    return None


def row_location(spec: DataSpec, row: int) -> tuple[str, str]:
    """(file, 'line N' or 'row K') of a local data set's row (0-based, over its files in order, as the
    store builder reads them): the line of JSON Lines and text, the row of a JSON array or parquet."""
    for file in spec.files:
        rows = count_rows(spec.model_copy(update={"files": [file]}))
        if row < rows:
            break
        row -= rows
    if spec.resolved_format() == "parquet" or is_json_array(file):
        return file, f"row {row + 1}"
    with OPENERS.get(os.path.splitext(file)[1], open)(file, "rt") as f:
        lines = (number for number, line in enumerate(f, 1) if line.strip())
        return file, f"line {next(number for k, number in enumerate(lines) if k == row)}"


def count_rows(spec: DataSpec) -> int:
    """Rows of a local data set, without tokenizing: parquet metadata, the length of a JSON array
    (read whole, as the builder reads it), or non-empty lines."""
    rows = 0
    for file in spec.files:
        fmt = spec.resolved_format()
        if fmt == "parquet":
            import pyarrow.parquet

            rows += pyarrow.parquet.ParquetFile(file).metadata.num_rows
            continue
        with OPENERS.get(os.path.splitext(file)[1], open)(file, "rt") as f:
            if fmt == "json" and is_json_array(file):
                try:
                    rows += len(json.load(f))
                except json.JSONDecodeError as error:  # past the sample file_problem read
                    raise PlanError([(file, "not valid JSON", f"a JSON array of row objects ({error.msg} at line {error.lineno} column {error.colno})")]) from None
            else:
                rows += sum(1 for line in f if line.strip())
    return rows
