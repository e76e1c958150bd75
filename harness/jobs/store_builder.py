"""Builds one token store: `python -m harness.jobs.store_builder '<StoreRequest JSON>'`.

Started by the launch side (harness/launch/jobs.py) before a stage launches. Reads the input
as a stream of row batches (bounded memory whatever the corpus size), turns each batch into
store rows with its objective's encoder (harness/objectives: the fast tokenizer's batch encoder,
which runs on every core, and for objectives with one a loss mask per token) and appends to the
store's files (format: harness/records/token_store.py).
Builds in '<key>.partial-<pid>' under an exclusive lock and renames it into place when
complete: two builders of the same store wait for each other, and a build cut short leaves
only a partial folder, removed by the next builder.
Exit 2 with one line on stderr for a problem in the data (a missing column, a row that does not
read as its shape, with its number, a hub set that cannot be reached).
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

from harness.objectives import OBJECTIVES, DataProblem
from harness.records.token_store import DATA_PROBLEM_EXIT, LOSS_MASK, META, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest, tokenizer_id
from harness.worker.model import load_tokenizer

BATCH_ROWS = 2000


def read_batches(request: StoreRequest):
    """Batches of rows (dict column -> list) from local files or a hub data set, streamed.
    Any error while reading is a DataProblem naming what was read."""
    import datasets

    spec = request.data
    source = f"hub data set {spec.hub!r} (split {spec.split!r})" if spec.hub else f"{', '.join(spec.files)}"
    try:
        if spec.hub is not None:
            rows = datasets.load_dataset(spec.hub, split=spec.split, streaming=True)
        else:
            fmt = spec.resolved_format()
            extra = {"sample_by": "paragraph"} if fmt == "text" else {}
            rows = datasets.load_dataset(fmt, data_files=spec.files, split="train", streaming=True, **extra)
        batches = rows.iter(batch_size=BATCH_ROWS)
        first = next(batches, None)
    except Exception as error:  # datasets raises many types for an unreachable set or a bad file
        where = "download it where there is a network, or use local files" if spec.hub else "fix or remove the file"
        raise DataProblem(f"{source} cannot be read ({type(error).__name__}: {error}); {where}") from None
    if first is None:
        raise DataProblem(f"{source}: no rows")
    missing = [column for column in OBJECTIVES[request.kind].required_columns(spec) if column not in first]
    if missing:
        raise DataProblem(f"no column {missing[0]!r}; columns: {sorted(first)}")
    return _reported(itertools.chain([first], batches), source)


def _reported(batches, source: str):
    """The batches; an error in a later part of the input becomes a DataProblem too."""
    try:
        yield from batches
    except Exception as error:
        raise DataProblem(f"{source} cannot be read ({type(error).__name__}: {error})") from None


def build(request: StoreRequest) -> None:
    tokenizer = load_tokenizer(request.tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    spec = request.data
    objective = OBJECTIVES[request.kind]
    encode_rows = objective.encoder(spec, tokenizer)

    final = request.folder
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder of this store finishes first
        if (final / META).is_file():
            return
        for stale in final.parent.glob(f"{final.name}.partial-*"):  # builds cut short: nobody holds the lock
            shutil.rmtree(stale)
        batches = read_batches(request)
        partial = final.parent / f"{final.name}.partial-{os.getpid()}"
        partial.mkdir()
        started = time.perf_counter()
        rows, tokens, read = 0, 0, 0  # store rows, tokens, and input rows read (a preference row makes two store rows)
        bar = tqdm(desc=f"tokenizing {request.kind}", unit=" rows", file=sys.stdout, mininterval=1.0)
        with open(partial / TOKENS, "wb") as token_file, open(partial / OFFSETS, "wb") as offset_file, \
                (open(partial / LOSS_MASK, "wb") if objective.loss_mask else contextlib.nullcontext()) as mask_file:
            offset_file.write(np.zeros(1, np.int64).tobytes())
            for batch in batches:
                encoded = encode_rows(batch, read + 1)
                read += len(next(iter(batch.values())))
                docs = [ids for ids, _ in encoded]
                if objective.loss_mask:
                    mask_file.write(np.fromiter(itertools.chain.from_iterable(m for _, m in encoded), np.uint8).tobytes())
                lengths = np.array([len(d) for d in docs], np.int64)
                token_file.write(np.fromiter(itertools.chain.from_iterable(docs), dtype, count=int(lengths.sum())).tobytes())
                offset_file.write((tokens + np.cumsum(lengths)).tobytes())
                rows += len(docs)
                tokens += int(lengths.sum())
                bar.update(len(docs))
        bar.close()
        input_bytes = sum(os.stat(f).st_size for f in spec.files)
        seconds = time.perf_counter() - started
        meta = StoreMeta(format=STORE_FORMAT, key=request.key, kind=request.kind, dtype=np.dtype(dtype).name, rows=rows, tokens=tokens,
                         input_bytes=input_bytes, inputs=spec.files or [f"hub:{spec.hub}:{spec.split}"], tokenizer=tokenizer_id(request.tokenizer),
                         build_seconds=round(seconds, 3))
        (partial / META).write_text(meta.model_dump_json(indent=2) + "\n")
        os.rename(partial, final)
    rate = f", {input_bytes / 1e6 / seconds:.1f} MB/s" if input_bytes else ""
    print(f"[harness] token store {final.name}: {rows:,} rows, {tokens:,} tokens in {seconds:.1f} s{rate}", flush=True)


def main() -> None:
    request = StoreRequest.model_validate_json(sys.argv[1])
    try:
        build(request)
    except DataProblem as problem:
        print(problem, file=sys.stderr)
        sys.exit(DATA_PROBLEM_EXIT)


if __name__ == "__main__":
    main()
