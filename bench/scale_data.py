"""Per-rank memory and start-up against corpus size: does a rank's cost stay flat as the text grows?

For each corpus size (generated text, byte tokenizer, tiny model, 2 CPU ranks) one run of two
pretrain phases on the same corpus, a few steps each:
- the token store build (launch side, once): seconds and MB/s;
- per-rank peak RSS (VmHWM each rank records at its milestones) in both stages;
- time to first step: from the stage's launch (its launcher.log appears) to its first metrics row.
  Stage 1 reads a store built just before; stage 2 reuses it, as every later stage does.
Ratios are against the smallest corpus measured in the same invocation.

    python bench/scale_data.py                      # 2, 20, 200 and 1000 MB
    python bench/scale_data.py --sizes-mb 2 20      # quicker
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, FileClock, run_harness, save_results, table, work_dir, write_plan  # noqa: E402

from harness.records import RunDir, StageDir  # noqa: E402
from harness.records.token_store import META, StoreMeta  # noqa: E402


def corpus(megabytes: int) -> Path:
    """Generated English-like text of about `megabytes` MB (random words, paragraphs of 30-200
    words), written once under bench/out."""
    path = OUT / "corpora" / f"text-{megabytes}mb.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(megabytes)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    paragraphs = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(30, 200))) + "\n\n" for _ in range(2000)).encode()
    with open(path.with_suffix(".partial"), "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(paragraphs) + 1):
            f.write(paragraphs)
    path.with_suffix(".partial").rename(path)
    return path


TOKENIZER_ONLY = """
import sys, time
from harness.worker.model import byte_tokenizer
paragraphs = open(sys.argv[1]).read().split("\\n\\n")
encoder = byte_tokenizer().backend_tokenizer
started = time.perf_counter()
for i in range(0, len(paragraphs), 2000):
    [e.ids for e in encoder.encode_batch(paragraphs[i : i + 2000], add_special_tokens=False)]
print(sum(map(len, paragraphs)) / 1e6 / (time.perf_counter() - started))
"""


def tokenizer_mb_per_s(text: Path) -> float:
    """The tokenizer's own batch speed on this text (in memory, no reading or writing): the
    store build's baseline. In a child process: this one stays free of torch."""
    return float(subprocess.run([sys.executable, "-c", TOKENIZER_ONLY, str(text)], capture_output=True, text=True, check=True).stdout.split()[-1])


def peak_rss(stage_dir: StageDir, ranks: int) -> list[float]:
    """Each rank's peak RSS in GB, as the rank recorded it at its last milestone."""
    return [json.loads(stage_dir.rank_memory(r).read_text())["peak_rss_bytes"] / 1e9 for r in range(ranks)]


def measure(megabytes: int, args, folder: Path) -> dict:
    text = corpus(megabytes)
    cache = folder / f"cache-{megabytes}mb"  # a fresh store per measurement: the build is timed too
    phases = [{"name": name, "steps": args.steps, "data": {"files": [str(text)]}} for name in ("first", "second")]
    plan = write_plan(folder / f"{megabytes}mb", f"scale-{megabytes}mb", args, phases, port=29900)
    plan.write_text(plan.read_text() + f"cache_dir: {cache}\n")
    out = folder / f"run-{megabytes}mb"
    stages = [RunDir(out).stage(k, name) for k, name in enumerate(("first", "second"))]
    watched = [p for s in stages for p in (s.launcher_log, s.metrics)]
    with FileClock(watched) as clock:
        run = run_harness(plan, out)
    meta = next(StoreMeta.read(p) for p in (cache / "tokens").iterdir() if (p / META).is_file())
    result = {"corpus_mb": text.stat().st_size / 1e6, "store_build_s": meta.build_seconds,
              "store_mb_per_s": meta.input_bytes / 1e6 / meta.build_seconds, "store_tokens": meta.tokens}
    for k, stage in enumerate(run.stage_dirs()):
        result[f"stage{k + 1}_first_step_s"] = clock.stamps[stage.metrics][0] - clock.appeared[stage.launcher_log]
        result[f"stage{k + 1}_peak_rss_gb"] = peak_rss(stage, args.ranks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[2, 20, 200, 1000])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.accelerator, args.ranks, args.zero, args.model, args.micro_batch, args.seq_len = "cpu", 2, 2, "tiny-llama", 4, 512
    folder = work_dir("scale-data")
    results = [measure(mb, args, folder) for mb in args.sizes_mb]
    tokenizer_speed = tokenizer_mb_per_s(corpus(args.sizes_mb[min(1, len(args.sizes_mb) - 1)]))
    base = results[0]
    rows = []
    for r in results:
        peak = max(r["stage1_peak_rss_gb"] + r["stage2_peak_rss_gb"])
        base_peak = max(base["stage1_peak_rss_gb"] + base["stage2_peak_rss_gb"])
        rows.append([f"{r['corpus_mb']:.0f}", f"{r['store_build_s']:.1f}", f"{r['store_mb_per_s']:.1f}",
                     " / ".join(f"{g:.2f}" for g in r["stage1_peak_rss_gb"]), " / ".join(f"{g:.2f}" for g in r["stage2_peak_rss_gb"]),
                     f"{peak / base_peak:.3f}", f"{r['stage1_first_step_s']:.1f}", f"{r['stage2_first_step_s']:.1f}",
                     f"{r['stage2_first_step_s'] / base['stage2_first_step_s']:.2f}"])
    print(table(["corpus MB", "store build s", "MB/s", "stage 1 peak RSS GB (ranks)", "stage 2 peak RSS GB (ranks)",
                 "peak vs smallest", "stage 1 first step s", "stage 2 first step s", "stage 2 vs smallest"], rows))
    best = max(r["store_mb_per_s"] for r in results)
    print(f"tokenizer alone (encode_batch in memory): {tokenizer_speed:.1f} MB/s; store build at best {best:.1f} MB/s = {best / tokenizer_speed:.2f} x")
    print(f"wrote {save_results('scale-data', {'results': results, 'tokenizer_mb_per_s': tokenizer_speed})}")


if __name__ == "__main__":
    main()
