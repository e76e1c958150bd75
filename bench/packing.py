"""Real (non-padding) tokens per second of a fine-tune stage with and without `packing: true`,
on the same rows, measured alternately in one invocation.

Each round runs the harness twice on a one-phase fine-tune plan (the demo's fine-tune set,
plans/data/finetune.jsonl, at the demo's seq_len 48): padded (one row per sequence, padded to
seq_len) and packed (a micro batch's rows end to end in one sequence). Packing changes neither
which rows a step trains on nor the loss, so both sides see the same real tokens; the figure is
those tokens over the time they took. Per step, from metrics.jsonl: real tokens =
train/tokens_per_s x the step's time (global_batch / train/samples_per_s). Two figures per side:
`step` (the sum of the steps' own times) and `wall` (time between metric rows arriving, which
also counts the loop's work between steps); the first --warmup steps of every run are skipped.
Headline: packed / padded `wall` tokens per second, and the share of padding in the padded runs.

    python bench/packing.py                                  # CPU: tiny-llama, 2 ranks, ZeRO-2, micro batch 8
    python bench/packing.py --micro-batch 32 --model small-llama
"""
from __future__ import annotations

import argparse
import statistics

import common
from common import REPO, FileClock, RunDir, fill_defaults, read_rows, run_harness, write_plan

FINETUNE_JSONL = REPO / "plans" / "data" / "finetune.jsonl"


def real_tokens(rows: list[dict], global_batch: int) -> list[tuple[float, float]]:
    """(real tokens, seconds) of each step's metrics row."""
    return [(r["train/tokens_per_s"] * global_batch / r["train/samples_per_s"], global_batch / r["train/samples_per_s"]) for r in rows]


def measure(rows: list[dict], stamps: list[float], warmup: int, global_batch: int) -> dict[str, float]:
    """Real tokens per second after `warmup` steps: `step` from the steps' own times, `wall` from
    the times rows arrived (the last row is left out: it is written after the final eval)."""
    steps = real_tokens(rows, global_batch)
    timed = steps[warmup:]
    walled = steps[warmup : len(rows) - 1]
    return {
        "step_tokens_per_s": sum(t for t, _ in timed) / sum(s for _, s in timed),
        "wall_tokens_per_s": sum(t for t, _ in walled) / (stamps[len(rows) - 2] - stamps[warmup - 1]),
        "real_tokens_per_step": statistics.mean(t for t, _ in timed),
        "steps_timed": len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=60, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps skipped at the start of each run")
    args = parser.parse_args()
    args.seq_len = args.seq_len or 48  # the demo's fine-tune phase
    fill_defaults(args)
    global_batch = args.micro_batch * args.ranks
    slots = global_batch * args.seq_len  # token positions of a padded step
    work = common.work_dir("packing")
    print(f"packing: {args.model}, ZeRO-{args.zero}, {args.ranks} {args.accelerator} rank(s), micro batch {args.micro_batch} rows, "
          f"seq_len {args.seq_len}, {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds; in {work}", flush=True)

    rounds = []
    for r in range(1, args.rounds + 1):
        result = {}
        for side, packing in (("padded", False), ("packed", True)):
            phase = {"name": "sft", "kind": "finetune", "steps": args.steps, "data": {"files": [str(FINETUNE_JSONL)], "packing": packing}}
            plan = write_plan(work / f"{side}-r{r}", "bench-packing", args, [phase], port=29500 + 20 * r + packing)
            out = work / f"{side}-r{r}" / "run"
            stage = RunDir(out).stage(0, "sft")
            with FileClock([stage.metrics]) as clock:
                run_harness(plan, out)
            result[side] = measure(read_rows(stage.metrics), clock.stamps[stage.metrics], args.warmup, global_batch)
        result["ratio_wall"] = result["packed"]["wall_tokens_per_s"] / result["padded"]["wall_tokens_per_s"]
        result["ratio_step"] = result["packed"]["step_tokens_per_s"] / result["padded"]["step_tokens_per_s"]
        rounds.append(result)
        print(f"round {r}: real tokens/s padded {result['padded']['wall_tokens_per_s']:,.0f}, packed {result['packed']['wall_tokens_per_s']:,.0f} "
              f"(wall), packed/padded {result['ratio_wall']:.2f}", flush=True)

    padding = 1 - statistics.mean(x["padded"]["real_tokens_per_step"] for x in rounds) / slots
    print()
    print(common.table(["round", "padded tok/s (wall)", "packed tok/s (wall)", "ratio (wall)", "padded tok/s (step)", "packed tok/s (step)", "ratio (step)"], [
        [r, f"{x['padded']['wall_tokens_per_s']:,.0f}", f"{x['packed']['wall_tokens_per_s']:,.0f}", f"{x['ratio_wall']:.2f}",
         f"{x['padded']['step_tokens_per_s']:,.0f}", f"{x['packed']['step_tokens_per_s']:,.0f}", f"{x['ratio_step']:.2f}"]
        for r, x in enumerate(rounds, 1)]))
    median = statistics.median(x["ratio_wall"] for x in rounds)
    print(f"\npadding in the padded runs: {padding:.0%} of {slots} token positions a step; "
          f"packed / padded real tokens per second (wall, median of {len(rounds)} rounds): {median:.2f}")
    path = common.save_results("packing", {"args": vars(args), "rounds": rounds, "padding_share": padding, "ratio_wall_median": median})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
