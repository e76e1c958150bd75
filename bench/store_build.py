"""The token store build against the tokenizer it runs, and its parts against the whole build.

On one generated corpus (default 200 MB; the byte tokenizer), in one invocation:
- baseline: the tokenizer's own `encode_batch` over the corpus's paragraphs in memory, on every
  core (no reading, no writing), measured before and after the builds;
- the whole store build (`python -m harness.jobs.store_builder`, one worker per core), from a
  fresh cache: its MB/s against the baseline's (target >= 0.9);
- the same build with one worker (the tokenizer's own threads only): what the workers pay;
- part 1/2 then part 2/2 (`--part I/N`, fresh cache): each part's seconds against the whole
  build's (target <= 0.55: what each of two nodes would spend; part 2/2 also joins).
Every build is timed from outside (process start to exit), as a user waits for it; the rounds
alternate the order of the builds (the machine's load drifts).

    python bench/store_build.py                 # 200 MB, 2 rounds: about 4 minutes on 2 cores
    python bench/store_build.py --megabytes 20  # quicker
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results, table, work_dir  # noqa: E402
from scale_data import corpus, tokenizer_mb_per_s  # noqa: E402

from harness.plan import DataSpec  # noqa: E402
from harness.records.token_store import StoreMeta  # noqa: E402
from harness.stages.stores import store_request  # noqa: E402


def timed_build(text: Path, cache: Path, *options: str) -> float:
    """Seconds of one store builder process (building what `options` say) on a cache of its own."""
    request = store_request("pretrain", DataSpec(files=[str(text)]), "bytes", str(cache), "bench data")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness.jobs.store_builder", request.model_dump_json(), *options], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def one_round(text: Path, folder: Path, parts_first: bool) -> dict[str, float]:
    """Seconds of the whole build, the one-worker build, and part 1/2 then part 2/2, each from a
    fresh cache; parts_first: the parts before the whole builds (rounds alternate the order)."""
    def parts() -> dict[str, float]:
        return {"part1_s": timed_build(text, folder / "parts", "--part", "1/2"), "part2_s": timed_build(text, folder / "parts", "--part", "2/2")}

    def wholes() -> dict[str, float]:
        return {"whole_s": timed_build(text, folder / "whole"), "one_worker_s": timed_build(text, folder / "one-worker", "--workers", "1")}

    times = {**parts(), **wholes()} if parts_first else {**wholes(), **parts()}
    whole, joined = (StoreMeta.read(next(p for p in (folder / name / "tokens").iterdir() if p.is_dir())) for name in ("whole", "parts"))
    assert (joined.rows, joined.tokens) == (whole.rows, whole.tokens), "the parts joined into the whole store"
    return {**times, "pieces": whole.pieces, "tokens": whole.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the builds, alternating their order")
    args = parser.parse_args()
    text, folder = corpus(args.megabytes), work_dir("store-build")
    mb = text.stat().st_size / 1e6
    tokenizer_before = tokenizer_mb_per_s(text)
    rounds = [one_round(text, folder / f"round{k + 1}", parts_first=k % 2 == 1) for k in range(args.rounds)]
    tokenizer_after = tokenizer_mb_per_s(text)
    tokenizer = (tokenizer_before + tokenizer_after) / 2
    rows = [["tokenizer encode_batch, all cores (baseline)", "", f"{mb / tokenizer:.1f}", f"{tokenizer:.1f}", "1.00",
             f"before {tokenizer_before:.1f}, after {tokenizer_after:.1f} MB/s"]]
    for k, r in enumerate(rounds, 1):
        rows += [["store build, one worker per core", k, f"{r['whole_s']:.1f}", f"{mb / r['whole_s']:.1f}", f"{mb / r['whole_s'] / tokenizer:.2f}",
                  f"{r['pieces']} pieces"],
                 ["store build, one worker", k, f"{r['one_worker_s']:.1f}", f"{mb / r['one_worker_s']:.1f}", f"{mb / r['one_worker_s'] / tokenizer:.2f}", ""],
                 ["part 1/2", k, f"{r['part1_s']:.1f}", "", "", f"{r['part1_s'] / r['whole_s']:.2f} x the whole build"],
                 ["part 2/2 (and the join)", k, f"{r['part2_s']:.1f}", "", "", f"{r['part2_s'] / r['whole_s']:.2f} x the whole build"]]
    print(f"corpus: {mb:.0f} MB, {rounds[0]['tokens']:,} tokens")
    print(table(["what", "round", "seconds", "MB/s", "vs tokenizer", "note"], rows))
    results = {"corpus_mb": mb, "tokenizer_mb_per_s": [tokenizer_before, tokenizer_after], "rounds": rounds}
    print(f"wrote {save_results('store-build', results)}")


if __name__ == "__main__":
    main()
