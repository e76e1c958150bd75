"""Builds one token store, or one part of it:

    python -m harness.jobs.store_builder '<StoreRequest JSON>' [--part I/N] [--workers W]

Started by the launch side (harness/launch/jobs.py) before a stage launches, and by `harness
tokenize`. The input is cut into pieces (harness/jobs/store_pieces.py), each piece is tokenized on
its own into a folder of its own by a pool of worker processes, and once every piece is there
they are joined into the store (format: harness/records/token_store.py): the same files, byte for
byte, as one process reading the whole input in one go. Each batch of rows becomes store rows
through its objective's encoder (harness/objectives), with a loss mask per token for objectives
that have one.

Finished pieces outlive a build cut short: the next build reuses them and builds the rest. A
piece is built in '<j>.partial-<pid>' under the piece's lock and renamed when complete, so two
builders (two nodes) never build one piece twice and a half-built piece is never used; the join
writes '<key>.partial-<pid>' under the store's lock and renames it into place. The first builder
records the cut (plan.json), so every builder on every node builds the same pieces. --part I/N
builds the pieces of part I of N only (a SLURM array task, or one command per node); whichever
part finds every piece there joins them.

Workers: one per core this process may use, each tokenizing with one thread. The fast tokenizer's
batch encoder uses every core by itself, but the Python around it (reading, splitting, writing)
runs on one: single-threaded workers, one per core, keep every core busy (measured:
bench/RESULTS.md). Workers die with the builder (PR_SET_PDEATHSIG), so killing it stops them.

Exit 2 with one line on stderr for a problem in the data (a missing column, a row that does not
read as its shape, named by file and row, a hub set that cannot be reached).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import itertools
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from harness.objectives import OBJECTIVES, DataProblem
from harness.jobs.store_pieces import plan_pieces, read_piece
from harness.records.token_store import (DATA_PROBLEM_EXIT, LOSS_MASK, META, OFFSETS, PIECE_META, PIECE_PLAN, STORE_FORMAT, TOKENS,
                                         PieceMeta, PiecePlan, StoreMeta, StoreRequest, parse_part, tokenizer_id)
from harness.worker.tokenizer import load_tokenizer

PR_SET_PDEATHSIG = 1


@dataclass
class Pieces:
    """A store's pieces and how to build one; forked workers inherit it (the tokenizer included)."""

    request: StoreRequest
    plan: PiecePlan
    tokenizer: Any
    dtype: np.dtype

    @property
    def folder(self) -> Path:
        return self.request.pieces_folder

    def path(self, j: int) -> Path:
        return self.folder / f"{j:06d}"

    def done(self, j: int) -> PieceMeta | None:
        """Piece j's record when it is complete and its files have the sizes it says."""
        try:
            meta = PieceMeta.model_validate_json((self.path(j) / PIECE_META).read_text())
        except (OSError, ValueError):
            return None
        expected = {TOKENS: meta.tokens * self.dtype.itemsize, OFFSETS: (meta.rows + 1) * 8}
        if OBJECTIVES[self.request.kind].loss_mask:
            expected[LOSS_MASK] = meta.tokens
        sizes_match = all((self.path(j) / name).is_file() and (self.path(j) / name).stat().st_size == size for name, size in expected.items())
        return meta if sizes_match else None

    def build(self, j: int, wait: bool, report: Callable[[int], None]) -> str:
        """Build piece j unless it is there: 'built', 'there' (built before, or meanwhile by another
        builder) or, when not waiting, 'busy' (another builder is building it)."""
        try:
            lock = open(self.folder / f"{j:06d}.lock", "a")
        except FileNotFoundError:  # the store was joined meanwhile and its pieces removed
            return "there"
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return "busy"
            if self.done(j) or (self.request.folder / META).is_file():  # its pieces are removed only once the store is there
                return "there"
            for stale in self.folder.glob(f"{j:06d}.partial-*"):  # cut short: nobody holds its lock
                shutil.rmtree(stale)
            self._tokenize(j, report)
            return "built"

    def _tokenize(self, j: int, report: Callable[[int], None]) -> None:
        piece, spec = self.plan.pieces[j], self.request.data
        objective = OBJECTIVES[self.request.kind]
        encode_rows, required = objective.encoder(spec, self.tokenizer), objective.required_columns(spec)
        where = piece.source + (f" from byte {piece.start:,}" if piece.start and piece.reader != "parquet" else "")
        partial = self.folder / f"{j:06d}.partial-{os.getpid()}"
        partial.mkdir()
        started, rows, tokens, read = time.perf_counter(), 0, 0, 0  # read: input rows (a preference row makes two store rows)
        with open(partial / TOKENS, "wb") as token_file, open(partial / OFFSETS, "wb") as offset_file, \
                (open(partial / LOSS_MASK, "wb") if objective.loss_mask else contextlib.nullcontext()) as mask_file:
            offset_file.write(np.zeros(1, np.int64).tobytes())
            for batch, used in read_piece(piece, spec):
                if len(next(iter(batch.values()), [])):
                    missing = [column for column in required if column not in batch]
                    if missing:
                        raise DataProblem(f"{where}: no column {missing[0]!r}; columns: {sorted(batch)}")
                    try:
                        encoded = encode_rows(batch, read + 1)
                    except DataProblem as problem:
                        raise DataProblem(f"{where}: {problem}") from None
                    read += len(next(iter(batch.values())))
                    lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int64, count=len(encoded))
                    token_file.write(np.fromiter(itertools.chain.from_iterable(ids for ids, _ in encoded), self.dtype, count=int(lengths.sum())).tobytes())
                    if objective.loss_mask:
                        mask_file.write(np.fromiter(itertools.chain.from_iterable(m for _, m in encoded), np.uint8, count=int(lengths.sum())).tobytes())
                    offset_file.write((tokens + np.cumsum(lengths)).tobytes())
                    rows, tokens = rows + len(encoded), tokens + int(lengths.sum())
                report(used)
        (partial / PIECE_META).write_text(PieceMeta(rows=rows, tokens=tokens, seconds=round(time.perf_counter() - started, 3)).model_dump_json())
        os.rename(partial, self.path(j))


def build(request: StoreRequest, part: tuple[int, int] = (1, 1), workers: int | None = None, piece_bytes: int | None = None) -> StoreMeta | None:
    """Build part `part` = (i, n) of the store's pieces, then join them if every piece is there.
    Returns the store's meta when it is complete (None: other parts are still missing).
    workers: processes (default: the cores this process may use); piece_bytes: the cut, for a
    store whose plan.json does not exist yet (default store_pieces.piece_bytes)."""
    if (request.folder / META).is_file():
        return StoreMeta.read(request.folder)
    started = time.perf_counter()
    tokenizer = load_tokenizer(request.tokenizer)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32)
    pieces = Pieces(request, _piece_plan(request, piece_bytes), tokenizer, dtype)
    mine = pieces.plan.part(*part)
    there = {j for j in mine if pieces.done(j)}
    todo = [j for j in mine if j not in there]
    label = f"tokenizing {request.kind}" + (f" part {part[0]}/{part[1]}" if part[1] > 1 else "")
    bar = tqdm(desc=label, total=sum(pieces.plan.pieces[j].size for j in mine), initial=sum(pieces.plan.pieces[j].size for j in there),
               unit="B", unit_scale=True, unit_divisor=1000, file=sys.stdout, mininterval=1.0, smoothing=0.1)
    workers = min(workers or len(os.sched_getaffinity(0)), len(todo)) or 1
    built = 0
    with bar:
        busy = [j for j, outcome in _build_pieces(pieces, todo, workers, False, bar) if outcome == "busy"]
        built += len(todo) - len(busy)
        if busy:
            print(f"[harness] waiting for {len(busy)} piece(s) another builder is tokenizing", flush=True)
            built += sum(outcome == "built" for _, outcome in _build_pieces(pieces, busy, workers, True, bar))
    if (request.folder / META).is_file():  # another builder joined it meanwhile
        return StoreMeta.read(request.folder)
    missing = [j for j in range(len(pieces.plan.pieces)) if not pieces.done(j)]
    if missing:
        print(f"[harness] token store {request.key} part {part[0]}/{part[1]}: {len(mine)} piece(s), {built} built now; "
              f"{len(pieces.plan.pieces) - len(missing)} of {len(pieces.plan.pieces)} pieces present: the store is joined when every part is built",
              flush=True)
        return None
    meta = _join(pieces, started, reused=len(pieces.plan.pieces) - built)
    if meta is not None:
        rate = f", {meta.input_bytes / 1e6 / meta.build_seconds:.1f} MB/s" if meta.input_bytes else ""
        print(f"[harness] token store {request.key}: {meta.rows:,} rows, {meta.tokens:,} tokens in {meta.build_seconds:.1f} s{rate} "
              f"({meta.pieces} pieces, {meta.pieces_reused} reused)", flush=True)
    return StoreMeta.read(request.folder)


def _piece_plan(request: StoreRequest, piece_bytes: int | None) -> PiecePlan:
    """The recorded cut of the store's input, or a new one, recorded (the first to link it wins)."""
    folder = request.pieces_folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PIECE_PLAN
    if not path.is_file():
        tmp = folder / f".{PIECE_PLAN}.{os.getpid()}"
        tmp.write_text(PiecePlan(pieces=plan_pieces(request.data, piece_bytes)).model_dump_json())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    return PiecePlan.model_validate_json(path.read_text())


def _build_pieces(pieces: Pieces, todo: list[int], workers: int, wait: bool, bar: tqdm) -> Iterator[tuple[int, str]]:
    """(piece, outcome) for each piece of `todo` as it finishes (Pieces.build), in this process or
    in `workers` forked ones; the bar counts the input bytes each piece has used."""
    counted = dict.fromkeys(todo, 0)

    def progress(j: int, used: int) -> None:
        counted[j] += used
        bar.update(used)

    def finished(j: int, outcome: str) -> tuple[int, str]:
        if outcome != "busy":
            bar.update(pieces.plan.pieces[j].size - counted[j])  # what the reader's estimate left out
        return j, outcome

    if workers == 1:
        for j in todo:
            yield finished(j, pieces.build(j, wait, lambda used, j=j: progress(j, used)))
        return
    for message in _in_workers(pieces, todo, workers, wait):
        if message[0] == "progress":
            progress(*message[1:])
        else:
            yield finished(*message[1:])


def _in_workers(pieces: Pieces, todo: list[int], workers: int, wait: bool) -> Iterator[tuple]:
    """Messages of forked workers building `todo`: ('progress', j, bytes) and ('done', j, outcome).
    A data problem or a crash in a worker stops every worker and is raised here."""
    context = multiprocessing.get_context("fork")  # the tokenizer is loaded once, here, and inherited
    tasks, results = context.Queue(), context.Queue()
    for j in [*todo, *[None] * workers]:
        tasks.put(j)
    processes = [context.Process(target=_worker, args=(pieces, tasks, results, wait, os.getpid()), daemon=True) for _ in range(workers)]
    for process in processes:
        process.start()
    left = len(todo)
    try:
        while left:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a tokenizing worker died (exit code {dead[0]})") from None
                continue
            if message[0] == "problem":
                raise DataProblem(message[1])
            if message[0] == "crash":
                raise RuntimeError(f"a tokenizing worker failed:\n{message[1]}")
            if message[0] == "done":
                left -= 1
            yield message
    finally:
        for process in processes:
            if left:  # stopped early (a data problem, a crash, or the builder is stopping): stop them now
                process.kill()
            process.join()


def _worker(pieces: Pieces, tasks, results, wait: bool, parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the builder, whatever ends it
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the workers share the cores
    while (j := tasks.get()) is not None:
        try:
            results.put(("done", j, pieces.build(j, wait, lambda used, j=j: results.put(("progress", j, used)))))
        except DataProblem as problem:
            results.put(("problem", str(problem)))
            return
        except BaseException:
            results.put(("crash", traceback.format_exc()))
            return


def _join(pieces: Pieces, started: float, reused: int) -> StoreMeta | None:
    """Join every piece into the store, under the store's lock; None when another builder joined it first."""
    request = pieces.request
    final = request.folder
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder joining this store finishes first
        if (final / META).is_file():
            return None
        for stale in final.parent.glob(f"{final.name}.partial-*"):  # joins cut short: nobody holds the lock
            shutil.rmtree(stale)
        metas = [pieces.done(j) for j in range(len(pieces.plan.pieces))]
        rows, tokens = sum(m.rows for m in metas), sum(m.tokens for m in metas)
        spec = request.data
        if rows == 0:
            source = f"hub data set {spec.hub!r} (split {spec.split!r})" if spec.hub else ", ".join(spec.files)
            raise DataProblem(f"{source}: no rows")
        partial = final.parent / f"{final.name}.partial-{os.getpid()}"
        partial.mkdir()
        names = [TOKENS, LOSS_MASK] if OBJECTIVES[request.kind].loss_mask else [TOKENS]
        for name in names:
            _concatenate([pieces.path(j) / name for j in range(len(metas))], partial / name)
        with open(partial / OFFSETS, "wb") as offsets:
            offsets.write(np.zeros(1, np.int64).tobytes())
            base = 0
            for j, meta in enumerate(metas):
                offsets.write((np.fromfile(pieces.path(j) / OFFSETS, np.int64)[1:] + base).tobytes())
                base += meta.tokens
        meta = StoreMeta(format=STORE_FORMAT, key=request.key, kind=request.kind, dtype=pieces.dtype.name, rows=rows, tokens=tokens,
                         input_bytes=sum(os.stat(f).st_size for f in spec.files), inputs=spec.files or [f"hub:{spec.hub}:{spec.split}"],
                         tokenizer=tokenizer_id(request.tokenizer), build_seconds=round(time.perf_counter() - started, 3),
                         pieces=len(metas), pieces_reused=reused)
        (partial / META).write_text(meta.model_dump_json(indent=2) + "\n")
        os.rename(partial, final)
        # Out of the way first: a builder still waiting for a piece creates no file in it (it finds no
        # folder, or the store), so the removal never races a new lock file ("directory not empty").
        removed = pieces.folder.with_name(f"{pieces.folder.name}.removed-{os.getpid()}")
        os.rename(pieces.folder, removed)
        shutil.rmtree(removed)
        return meta


def _concatenate(sources: list[Path], target: Path) -> None:
    """target = the sources one after the other (copied in the kernel, not through Python)."""
    with open(target, "wb") as out:
        for source in sources:
            with open(source, "rb") as f:
                left = os.fstat(f.fileno()).st_size
                while left:
                    left -= os.copy_file_range(f.fileno(), out.fileno(), left)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build one token store (started by the harness).")
    parser.add_argument("request", help="the StoreRequest as JSON")
    parser.add_argument("--part", type=parse_part, default=(1, 1), metavar="I/N")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    args = parser.parse_args()
    try:
        build(StoreRequest.model_validate_json(args.request), args.part, args.workers)
    except DataProblem as problem:
        print(problem, file=sys.stderr)
        sys.exit(DATA_PROBLEM_EXIT)


if __name__ == "__main__":
    main()
