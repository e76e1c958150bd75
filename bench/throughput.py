"""Harness worker step throughput against a minimal raw DeepSpeed loop, measured alternately.

Each round runs, one after the other:
  A  the harness: `python -m harness.cli run` on a one-phase pretrain plan (fresh run folder),
     the real orchestrator, launcher and worker; rows read from the stage's metrics.jsonl;
  B  bench/raw_loop.py: the same launcher command and rank environment, the same stage.json
     (model, data file, batch shape) and the same generated ds_config.json as round 1's stage.
A runs with the plan's `fast` setting (--fast: auto, off, or parts such as compile,liger), B is
always eager: the fast path is measured against raw DeepSpeed eager on the same model, batch and
ZeRO stage. A B A B ...: slow drifts of a noisy machine hit both sides alike. The first --warmup steps
of every run are skipped. Two figures per side (see common.throughput): `step`, from each
row's own step time, and `wall`, from the times rows appear, which also counts the loop's
work between steps; the ratio harness/raw of `wall` is the headline (target >= 0.98).

    python bench/throughput.py                                   # CPU: tiny-llama, 2 ranks, ZeRO-2
    python bench/throughput.py --accelerator cuda --zero 2       # 1 GPU, bf16, ~370M Llama, 16 x 1024
    python bench/throughput.py --accelerator cuda --zero 3 --fast compile,liger   # the fast path's parts
"""
from __future__ import annotations

import argparse
import json
import statistics

import common
from common import BENCH, FileClock, RunDir, fill_defaults, launch_like_stage, read_rows, run_harness, throughput, write_plan

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 100 on cpu, 30 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="steps skipped at the start of each run (default: 10 on cpu, 5 on cuda)")
    args = parser.parse_args()
    fill_defaults(args)
    args.steps = args.steps or (100 if args.accelerator == "cpu" else 30)
    args.warmup = args.warmup or (10 if args.accelerator == "cpu" else 5)
    tokens_per_step = args.micro_batch * args.ranks * args.seq_len  # packed blocks, no accumulation
    work = common.work_dir("throughput")
    print(f"throughput: {args.model}, ZeRO-{args.zero}, {args.ranks} {args.accelerator} rank(s), "
          f"micro batch {args.micro_batch} x {args.seq_len}, {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds; in {work}", flush=True)

    rounds, template, params = [], None, None
    for r in range(1, args.rounds + 1):
        # A: the harness, end to end.
        plan = write_plan(work / f"harness-r{r}", "bench-throughput", args, [{"name": "train", "steps": args.steps}], port=29500 + 20 * r)
        out = work / f"harness-r{r}" / "run"
        stage = RunDir(out).stage(0, "train")
        with FileClock([stage.metrics]) as clock:
            run_harness(plan, out)
        harness = throughput(read_rows(stage.metrics), clock.stamps[stage.metrics], args.warmup, tokens_per_step)
        manifest = json.loads(stage.manifest.read_text())
        harness["fast"] = manifest["fast"]
        harness["gpu_peak_bytes"] = json.loads(stage.rank_memory(0).read_text())["milestones"]["end"].get("gpu_peak_bytes")
        harness["peak_rss_bytes"] = json.loads(stage.rank_memory(0).read_text())["peak_rss_bytes"]
        template = template or stage

        # B: the raw loop under the same launcher, config and data shape.
        raw_dir = work / f"raw-r{r}"
        raw_dir.mkdir()
        metrics = raw_dir / "metrics.jsonl"
        with FileClock([metrics]) as clock:
            launch_like_stage(template, BENCH / "raw_loop.py",
                              ["--stage", str(template.stage_json), "--ds-config", str(template.ds_config), "--steps", str(args.steps), "--metrics", str(metrics)],
                              raw_dir / "launcher.log", port_from=29800 + 20 * r)
        raw_rows = read_rows(metrics)
        raw = throughput(raw_rows, clock.stamps[metrics], args.warmup, tokens_per_step)
        raw["gpu_peak_bytes"] = raw_rows[-1].get("gpu_peak_bytes")
        params = raw_rows[0]["params"]
        rounds.append({"round": r, "harness": harness, "raw": raw})
        print(f"  round {r}: harness {harness['wall_tokens_per_s']:,.0f} tok/s, raw {raw['wall_tokens_per_s']:,.0f} tok/s (wall)", flush=True)

    summary = {}
    for way in ("wall", "step"):
        h = statistics.mean(x["harness"][f"{way}_tokens_per_s"] for x in rounds)
        b = statistics.mean(x["raw"][f"{way}_tokens_per_s"] for x in rounds)
        summary[way] = {"harness_tokens_per_s": h, "raw_tokens_per_s": b, "ratio": h / b,
                        "round_ratios": [x["harness"][f"{way}_tokens_per_s"] / x["raw"][f"{way}_tokens_per_s"] for x in rounds]}
        if args.accelerator == "cuda":
            summary[way]["harness_mfu"] = 6 * params * h / H100_BF16_PEAK
            summary[way]["raw_mfu"] = 6 * params * b / H100_BF16_PEAK

    rows = []
    for way in ("wall", "step"):
        s = summary[way]
        mfu = f"{s['harness_mfu']:.1%} / {s['raw_mfu']:.1%}" if "harness_mfu" in s else "-"
        rows.append([way, f"{s['harness_tokens_per_s']:,.0f}", f"{s['raw_tokens_per_s']:,.0f}", f"{s['ratio']:.3f}",
                     " ".join(f"{x:.3f}" for x in s["round_ratios"]), mfu])
    fast = rounds[0]["harness"]["fast"]
    print(f"\nharness fast path: compile {fast['compile']}, liger {fast['liger']}, attention {fast['attention']}"
          + "".join(f"; {part} fell back: {why}" for part, why in fast["fallbacks"].items()))
    gpu = [(x["harness"]["gpu_peak_bytes"], x["raw"]["gpu_peak_bytes"]) for x in rounds]
    if gpu[0][0] is not None:
        print("peak GPU memory (rank 0), harness / raw: " + ", ".join(f"{h / 2**30:.1f} / {b / 2**30:.1f} GiB" for h, b in gpu))
    print()
    print(common.table(["tokens/s", "harness", "raw", "harness/raw", "per round", "MFU h/raw"], rows))
    path = common.save_results("throughput", {
        "settings": {k: v for k, v in vars(args).items()}, "params": params, "tokens_per_step": tokens_per_step,
        "rounds": rounds, "summary": summary, "work_dir": str(work),
    })
    target = "target >= 0.98 eager" if args.fast == "off" else "fast path targets on one H100: >= 2.0 at ZeRO-2, >= 1.5 at ZeRO-3"
    print(f"\nharness/raw (wall) = {summary['wall']['ratio']:.3f}  ({target});  results: {path}")


if __name__ == "__main__":
    main()
