"""Does a data file read as the plan says? Checked on a bounded sample before anything is written.

The token-store builder (harness/store_builder.py) reads every row later and stops at the first
one it cannot use, without a line number. These checks run when the plan loads and name the file
and line of the common mistakes: an empty file, a JSON line that does not parse, a row without
the column the phase needs (or with no text in it). Only the first SAMPLE_LINES lines (at most
SAMPLE_BYTES) of a text or JSON Lines file are read, through the decompressor of a .gz, .bz2 or
.xz file, and only the metadata of a parquet file. Launch side: no torch, no datasets.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zlib

SAMPLE_LINES = 1000
SAMPLE_BYTES = 1 << 20  # and at most this much of each file: a line can be long
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# The one column Hugging Face datasets' text loader gives a text file.
TEXT_COLUMN = "text"


def file_problem(path: str, fmt: str, columns: list[str]) -> str | None:
    """What is wrong with one data file of a data set in format fmt ('text', 'json' or 'parquet')
    whose rows need these columns; None when its sample reads well."""
    if fmt == "parquet":
        return _parquet_problem(path, columns)
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
    lines = data.split(b"\n") if whole else data.split(b"\n")[:-1]  # the last one may be cut
    rows = []
    for n, line in enumerate(lines[:SAMPLE_LINES], 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"UTF-8 text (line {n} is not: {error.reason} at byte {error.start})"
        if text.strip():
            rows.append((n, text))
    if fmt == "text":
        missing = [column for column in columns if column != TEXT_COLUMN]
        return f"a column {missing[0]!r} (a text file has one, {TEXT_COLUMN!r}: use json or parquet files)" if missing else None
    return _json_lines_problem(rows, columns)


def _json_lines_problem(rows: list[tuple[int, str]], columns: list[str]) -> str | None:
    """JSON Lines: one object per line, each with text in every column the phase needs. A file
    that opens with '[' or a lone '{' is one JSON document instead, which the builder reads whole."""
    if not rows or rows[0][1].strip().startswith("[") or rows[0][1].strip() == "{":
        return None
    for n, line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"JSON Lines, one object per line (line {n} is not valid JSON: {error.msg} at column {error.colno})"
        if not isinstance(row, dict):
            return f"JSON Lines, one object per line (line {n} holds a {type(row).__name__})"
        for column in columns:
            if column not in row:
                return f"rows with a column {column!r} (line {n} has none; its columns: {sorted(row)})"
            if not isinstance(row[column], str):
                return f"text in column {column!r} (line {n} holds {row[column]!r})"
    return None


def _parquet_problem(path: str, columns: list[str]) -> str | None:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        return f"a parquet file ({error})"
    if parquet.metadata.num_rows == 0:
        return "a file with rows (this one has none)"
    schema = parquet.schema_arrow
    for column in columns:
        if column not in schema.names:
            return f"a column {column!r} (its columns: {schema.names})"
        kind = schema.field(column).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            return f"text in column {column!r} (it holds {kind})"
    return None
