"""A store's input in pieces, and one piece read as batches of rows.

Each piece is tokenized on its own (by any process, on any node); laid one after the other, the
rows of the pieces are the rows of the whole input read in one go, as Hugging Face datasets reads
them (the builder read everything with datasets before; a test compares the stores byte for byte):

- a plain text file is cut into byte ranges where a blank line starts: its rows are paragraphs,
  as datasets' text loader with sample_by=paragraph makes them (newlines translated as Python's
  text mode does, split on "\\n\\n", empty ones dropped). In a run of newlines the blank lines pair
  up from the run's start, so a cut after the run's first two newlines splits no row and makes none;
- a plain JSON Lines file is cut at line ends, each range parsed with pyarrow's JSON reader (the
  one datasets uses);
- a compressed text or JSON Lines file (.gz, .bz2, .xz) is one piece, read through its decompressor;
- a parquet file is cut into runs of row groups, read with pyarrow (as datasets does);
- a JSON array file, a .zst file or a hub set is one piece, read with datasets as before.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
from pathlib import Path
from typing import Iterator

from harness.objectives import DataProblem
from harness.plan import DataSpec
from harness.records.token_store import Piece

BATCH_ROWS = 2000
CHUNK = 4 << 20  # bytes read at a time
MIN_PIECE, MAX_PIECE, TARGET_PIECES = 1 << 20, 64 << 20, 256
DECOMPRESSORS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
BOM = b"\xef\xbb\xbf"
# Where a blank line starts: the first two newlines (\r\n, \r or \n, each taken whole) of a run of
# newlines that follows another character. Atomic groups: "\r\n" is one newline, never two.
BLANK_LINE = re.compile(rb"(?<![\r\n])(?>\r\n|\r|\n)(?>\r\n|\r|\n)")

Batches = Iterator[tuple[dict[str, list], int]]
"""Batches of rows (column -> values) of a piece, each with the input bytes it used up."""


def piece_bytes(total: int) -> int:
    """The size pieces are cut to: about TARGET_PIECES of them (enough to keep every worker of a
    node busy to the end), between 1 MB and 64 MB. A function of the input alone, so that every
    node cuts the same pieces."""
    return min(MAX_PIECE, max(MIN_PIECE, total // TARGET_PIECES))


def plan_pieces(spec: DataSpec, size: int | None = None) -> list[Piece]:
    """The pieces of a data set's input, in row order (size: bytes per piece, default piece_bytes)."""
    if spec.hub is not None:
        return [Piece(source=spec.hub, reader="datasets", size=0)]
    size = size or piece_bytes(sum(os.stat(path).st_size for path in spec.files))
    return [piece for path in spec.files for piece in _file_pieces(path, spec.resolved_format(), size)]


def _file_pieces(path: str, fmt: str, size: int) -> list[Piece]:
    file_size = os.stat(path).st_size
    suffix = Path(path).suffix.lower()
    if fmt == "parquet":
        return _parquet_pieces(path, size)
    compression = suffix if suffix in DECOMPRESSORS else None
    if suffix == ".zst" or (fmt == "json" and _json_array(path, compression)):
        return [Piece(source=path, reader="datasets", size=file_size)]
    reader = "text" if fmt == "text" else "jsonl"
    if compression:
        return [Piece(source=path, reader=reader, compression=compression, size=file_size)]
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + size < file_size and (cut := _cut(f, cuts[-1] + size, reader)) is not None:
            cuts.append(cut)
    cuts.append(file_size)
    return [Piece(source=path, reader=reader, start=a, end=b, size=b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


def _cut(f, nominal: int, reader: str) -> int | None:
    """The first place at or after `nominal` where a piece may end: after a line end (jsonl), or
    after the first two newlines of a blank line (text); None when there is none before the end."""
    if reader == "jsonl":
        f.seek(nominal - 1)
        line = f.readline()
        return nominal - 1 + len(line) if line.endswith(b"\n") else None
    start = nominal - 1  # one byte of context: a run of newlines counts only from its start
    while True:
        f.seek(start)
        window = f.read(CHUNK)
        at_end = len(window) < CHUNK
        found = BLANK_LINE.search(window, 1)
        # A match must be followed by a byte of the window (else "\r" + "\n" may be cut apart).
        if found and (found.end() < len(window) or at_end):
            return start + found.end()
        if at_end:
            return None
        start += len(window) - 3  # a run of newlines may straddle two windows


def _json_array(path: str, compression: str | None) -> bool:
    """Whether a JSON file holds one array of rows rather than a row per line."""
    with _open(path, compression) as f:
        head = f.read(4096)
    return head.removeprefix(BOM).lstrip().startswith(b"[")


def _parquet_pieces(path: str, size: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    groups = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns)) for g in range(meta.num_row_groups)]
    pieces, start, taken = [], 0, 0
    for g, group_bytes in enumerate(groups):
        taken += group_bytes
        if taken >= size or g == len(groups) - 1:
            pieces.append(Piece(source=path, reader="parquet", start=start, end=g + 1, size=taken))
            start, taken = g + 1, 0
    return pieces


def _open(path: str, compression: str | None):
    return DECOMPRESSORS[compression](path, "rb") if compression else open(path, "rb")


def read_piece(piece: Piece, spec: DataSpec) -> Batches:
    """The piece's rows in batches (a batch may be empty: input that held no row); a read that
    fails becomes a DataProblem naming the input."""
    if piece.reader == "datasets":
        return _datasets_rows(piece, spec)
    rows = {"text": _text_rows, "jsonl": _json_rows, "parquet": _parquet_rows}[piece.reader](piece)
    return _reported(rows, piece)


def _reported(batches: Batches, piece: Piece) -> Batches:
    try:
        yield from batches
    except Exception as error:  # a decompressor, the UTF-8 decoder, the JSON or parquet reader
        raise DataProblem(f"{piece.source} cannot be read ({type(error).__name__}: {error}); fix or remove the file") from None


def _blocks(piece: Piece) -> Iterator[tuple[bytes, int]]:
    """The piece's bytes about CHUNK at a time, each block read on to a line end, with the input
    bytes it used (of a compressed file: as far as the decompressor has read)."""
    with open(piece.source, "rb") as raw:
        if piece.compression:
            with DECOMPRESSORS[piece.compression](fileobj=raw) as stream:
                while block := stream.read(CHUNK):
                    before = raw.tell()
                    yield block + (b"" if block.endswith(b"\n") else stream.readline()), raw.tell() - before
            return
        raw.seek(piece.start)
        while (left := piece.end - raw.tell()) > 0:
            block = raw.read(min(CHUNK, left))
            if not block.endswith(b"\n") and len(block) < left:
                block += raw.readline(left - len(block))
            yield block, len(block)


def _text_rows(piece: Piece) -> Batches:
    """Paragraphs: newlines translated as Python's text mode does, split on blank lines, none empty."""
    carry = ""
    for block, used in _blocks(piece):
        text = block.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        *done, carry = (carry + text).split("\n\n")
        yield from _batched({"text": [paragraph for paragraph in done if paragraph]}, used)
    if carry:
        yield {"text": [carry]}, 0


def _json_rows(piece: Piece) -> Batches:
    import pyarrow.json as paj

    for k, (block, used) in enumerate(_blocks(piece)):
        if k == 0 and piece.start == 0:
            block = block.removeprefix(BOM)  # as datasets does
        # One parse block for the whole block: no row can straddle two.
        rows = paj.read_json(io.BytesIO(block), read_options=paj.ReadOptions(block_size=len(block) + 1)).to_pydict() if block.strip() else {}
        yield from _batched(rows, used)


def _batched(rows: dict[str, list], used: int) -> Batches:
    """Rows in batches of at most BATCH_ROWS; the input bytes go with the first."""
    n = len(next(iter(rows.values()), []))
    for start in range(0, max(n, 1), BATCH_ROWS):
        yield {column: values[start : start + BATCH_ROWS] for column, values in rows.items()}, used if start == 0 else 0


def _parquet_rows(piece: Piece) -> Batches:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(piece.source)
    groups = list(range(piece.start, piece.end))
    rows = sum(parquet.metadata.row_group(g).num_rows for g in groups) or 1
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
        yield batch.to_pydict(), piece.size * batch.num_rows // rows


def _datasets_rows(piece: Piece, spec: DataSpec) -> Batches:
    """A whole file or hub set through Hugging Face datasets, streamed (bounded memory)."""
    import datasets

    source = f"hub data set {spec.hub!r} (split {spec.split!r})" if spec.hub else piece.source
    try:
        if spec.hub is not None:
            rows = datasets.load_dataset(spec.hub, split=spec.split, streaming=True)
        else:
            fmt = spec.resolved_format()
            extra = {"sample_by": "paragraph"} if fmt == "text" else {}
            rows = datasets.load_dataset(fmt, data_files=[piece.source], split="train", streaming=True, **extra)
        for k, batch in enumerate(rows.iter(batch_size=BATCH_ROWS)):
            yield batch, piece.size if k == 0 else 0
    except Exception as error:  # datasets raises many types for an unreachable set or a bad file
        where = "download it where there is a network, or use local files" if spec.hub else "fix or remove the file"
        raise DataProblem(f"{source} cannot be read ({type(error).__name__}: {error}); {where}") from None
