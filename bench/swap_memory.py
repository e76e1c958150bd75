"""Host memory (and GPU memory on a GPU) of the ranks across engine swaps: one launch that runs
21 stages (20 swaps) of a multistep phase, cycling SGD -> SGD with momentum -> AdamW and
ZeRO-2 -> ZeRO-2 -> ZeRO-3, a few steps each, so every swap also changes the optimizer
and every third the ZeRO family. Read from the ranks' own memory records: the RSS a rank holds
when the next stage begins (after the previous engine was torn down), and each stage's peak.

The baseline, in the same run: the first stage's peak. Growth per swap is the slope of the
start-of-stage RSS over stages 2..21 (least squares), as a share of that peak; the target is
under 1% per swap.

    python bench/swap_memory.py                      # CPU: tiny-llama, 2 ranks
    python bench/swap_memory.py --model small-llama  # a larger model on CPU
    python bench/swap_memory.py --accelerator cuda   # 1 GPU: GPU memory too
"""
from __future__ import annotations

import argparse
import json
import statistics

import common
from common import RunDir, fill_defaults, run_harness, write_plan

CYCLE = [
    {"optimizer": {"type": "SGD", "lr": 0.01}, "zero_stage": 2},
    {"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}, "zero_stage": 2},
    {"optimizer": {"type": "AdamW", "lr": 1e-4}, "zero_stage": 3},
]


def slope(values: list[float]) -> float:
    """Least-squares growth per step of `values` (one value per stage)."""
    xs = range(len(values))
    mean_x, mean_y = statistics.mean(xs), statistics.mean(values)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--cycles", type=int, default=7, help="cycles of 3 stages (7: 21 stages, 20 swaps)")
    parser.add_argument("--steps", type=int, default=3, help="steps per stage")
    args = parser.parse_args()
    fill_defaults(args)
    work = common.work_dir("swap-memory")
    stages = [{**stage, "steps": args.steps} for stage in CYCLE]
    phase = {"name": "swaps", "kind": "multistep", "cycles": args.cycles, "data": {"pretrain": {"files": [str(common.PRETRAIN_TEXT)]}, "finetune": {"files": [str(common.FINETUNE_JSONL)]}},
             "stages": [{**stage, "data": "pretrain"} for stage in stages]}
    plan = write_plan(work, "bench-swap-memory", args, [phase], port=29700)
    print(f"swap memory: {args.model}, {args.ranks} {args.accelerator} rank(s), {3 * args.cycles} stages of {args.steps} steps in one launch; in {work}", flush=True)
    run = RunDir(work / "run")
    run_harness(plan, run.root)

    stage_dirs = run.stage_dirs()
    ranks = range(args.ranks)
    records = [[json.loads(d.rank_memory(rank).read_text())["milestones"] for rank in ranks] for d in stage_dirs]
    launches = {json.loads(d.rank_record(0).read_text())["pid"] for d in stage_dirs}
    assert len(launches) == 1, f"the stages ran in {len(launches)} processes, not one launch"
    rows, start_rss, peaks = [], {rank: [] for rank in ranks}, {rank: [] for rank in ranks}
    for k, (d, per_rank) in enumerate(zip(stage_dirs, records)):
        for rank in ranks:
            start_rss[rank].append(per_rank[rank]["before_model"]["rss_bytes"])
            peaks[rank].append(per_rank[rank]["end"]["peak_rss_bytes"])
        gpu = per_rank[0]["end"].get("gpu_peak_bytes")
        rows.append([k + 1, d.root.name.split("-", 1)[1], *(f"{start_rss[r][-1] / 1e6:,.0f}" for r in ranks),
                     *(f"{peaks[r][-1] / 1e6:,.0f}" for r in ranks), "-" if gpu is None else f"{gpu / 1e6:,.0f}"])
    headers = ["stage", "name", *(f"rank{r} RSS at start MB" for r in ranks), *(f"rank{r} peak MB" for r in ranks), "GPU peak MB (rank 0)"]
    print()
    print(common.table(headers, rows))
    growth = {rank: slope(start_rss[rank][1:]) / peaks[rank][0] for rank in ranks}
    summary = {"stages": len(stage_dirs), "growth_per_swap_of_first_peak": growth,
               "first_peak_bytes": {r: peaks[r][0] for r in ranks}, "start_rss_bytes": start_rss, "peak_rss_bytes": peaks}
    path = common.save_results("swap_memory", {"settings": vars(args), "summary": summary, "work_dir": str(work)})
    print("\n" + ";  ".join(f"rank {r}: start-of-stage RSS grows {100 * g:+.3f}% of the first stage's peak per swap" for r, g in growth.items())
          + f"  (target: under 1%);  results: {path}")


if __name__ == "__main__":
    main()
