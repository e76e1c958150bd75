"""Builds one token store: `python -m harness.store_builder '<StoreRequest JSON>'`.

Started by the launch side (harness/token_store.py) before a stage launches. Reads the
input as a stream of row batches (bounded memory whatever the corpus size), tokenizes each
batch with the fast tokenizer (its batch encoder runs on every core) and appends to the
store's files. Fine-tune rows get a loss mask: prompt/response rows from the two columns
tokenized apart (as before chat rows existed), alpaca and chat rows from the character spans
of their assistant turns in the rendered conversation (harness/formats.py), mapped onto tokens
through the tokenizer's offsets, so the tokens are those the template gives at generation.
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
from typing import Callable

import numpy as np
from tqdm import tqdm

from harness import formats
from harness.token_store import DATA_PROBLEM_EXIT, LOSS_MASK, META, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest, tokenizer_id

BATCH_ROWS = 2000


class DataProblem(Exception):
    """The data cannot be tokenized as the plan describes it."""


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
    missing = [column for column in formats.required_columns(spec, request.kind) if column not in first]
    if missing:
        raise DataProblem(f"no column {missing[0]!r}; columns: {sorted(first)}")
    return _reported(itertools.chain([first], batches), source)


def _reported(batches, source: str):
    """The batches; an error in a later part of the input becomes a DataProblem too."""
    try:
        yield from batches
    except Exception as error:
        raise DataProblem(f"{source} cannot be read ({type(error).__name__}: {error})") from None


# A batch of rows (dict column -> list) and the number of its first row -> (token ids, loss mask) per row.
RowEncoder = Callable[[dict[str, list], int], list[tuple[list[int], list[int]]]]


def pair_encoder(spec, tokenizer) -> RowEncoder:
    """prompt + response + end-of-sequence, the two columns tokenized apart; loss on the response."""
    encode = _encoder(tokenizer)

    def rows(batch: dict[str, list], first_row: int) -> list[tuple[list[int], list[int]]]:
        pairs = zip(encode(batch[spec.prompt_field]), encode(batch[spec.response_field]))
        return [(p + r + [tokenizer.eos_token_id], [0] * len(p) + [1] * len(r) + [2]) for p, r in pairs]

    return rows


def chat_encoder(spec, tokenizer) -> RowEncoder:
    """Alpaca and chat rows rendered with the tokenizer's chat template (the built-in one when it has
    none); loss on every assistant turn, content 1, end of turn 2."""
    import jinja2

    from harness.worker.model import give_chat_template

    give_chat_template(tokenizer)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def rows(batch: dict[str, list], first_row: int) -> list[tuple[list[int], list[int]]]:
        texts, spans = [], []
        for k, values in enumerate(zip(*batch.values())):
            try:
                text, turn_spans = formats.render_with_spans(formats.messages_of(dict(zip(batch, values)), spec), render)
            except formats.RowProblem as problem:
                raise DataProblem(f"row {first_row + k}: {problem.expected} (it {problem.found})") from None
            except jinja2.TemplateError as error:  # a template's raise_exception: e.g. roles that do not alternate
                raise DataProblem(f"row {first_row + k}: a conversation the tokenizer's chat template renders (it says: {error})") from None
            texts.append(text)
            spans.append(turn_spans)
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, loss_mask(e.offsets, s)) for e, s in zip(encodings, spans)]

    return rows


def loss_mask(offsets: list[tuple[int, int]], spans: formats.Spans) -> list[int]:
    """Per token, by the character it starts at: 1 inside an assistant turn's content, 2 in its end of
    turn, 0 elsewhere. The spans are ordered and disjoint, so a token's place among their boundaries
    (start, content_end, end, start, ...) says which: index 1 of 3 content, 2 end of turn, 0 outside."""
    bounds = np.array([b for span in spans for b in span], np.int64)
    place = np.searchsorted(bounds, np.array([start for start, _ in offsets], np.int64), side="right") % 3
    return place.tolist()


def _encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    encoder = tokenizer.backend_tokenizer
    return lambda texts: [e.ids for e in encoder.encode_batch(texts, add_special_tokens=False)]


def build(request: StoreRequest) -> None:
    from harness.worker.model import load_tokenizer

    tokenizer = load_tokenizer(request.tokenizer)
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    spec = request.data
    finetune = request.kind == "finetune"
    encode = _encoder(tokenizer)
    encode_rows = (chat_encoder if formats.uses_template(spec) else pair_encoder)(spec, tokenizer) if finetune else None

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
        rows, tokens = 0, 0
        bar = tqdm(desc=f"tokenizing {request.kind}", unit=" rows", file=sys.stdout, mininterval=1.0)
        with open(partial / TOKENS, "wb") as token_file, open(partial / OFFSETS, "wb") as offset_file, \
                (open(partial / LOSS_MASK, "wb") if finetune else contextlib.nullcontext()) as mask_file:
            offset_file.write(np.zeros(1, np.int64).tobytes())
            for batch in batches:
                if finetune:
                    encoded = encode_rows(batch, rows + 1)
                    docs = [ids for ids, _ in encoded]
                    mask_file.write(np.fromiter(itertools.chain.from_iterable(m for _, m in encoded), np.uint8).tobytes())
                else:
                    docs = [ids + [eos] for ids in encode(batch[spec.text_field])]
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
