"""Phase transition time of the harness (end of phase 1's last step -> phase 2's first step),
split into parts, beside a bare relaunch of the same launcher (the baseline, same run).

Each round runs a two-phase plan with `python -m harness.cli run` (both phases alike, so
phase 2 takes the full_state path: DeepSpeed checkpoint with optimizer moments), then
bench/noop_rank.py under phase 2's exact launcher command. The harness is not changed or
instrumented: each part ends at a moment the harness leaves behind anyway, on this machine's
wall clock. Moments marked * are seen by polling (common.FileClock), since file mtimes can
be whole seconds; the others are times the harness writes itself.

  end of training   * phase 1's last metrics row (written after the final eval)
  DeepSpeed ckpt    * checkpoints/latest appears (DeepSpeed writes it after the checkpoint)
  HF write starts   * model/model.safetensors appears (weights gathered, digests taken)
  manifest            manifest.json "finished" (safetensors written, model/ checksummed)
  launcher start    * phase 2's .deepspeed_env appears (written just before the launcher starts)
  ranks ready         phase 2 ranks/rank0.json "time" (imports done, process group up)
  loaded              phase 2 started.json "time" (model, data, initialize, checkpoint load, digests)
  first step        * phase 2's first metrics row

    python bench/transition.py                                  # CPU: tiny-llama, 2 ranks, ZeRO-2
    python bench/transition.py --accelerator cuda --rounds 1    # 1 GPU, bf16, ~370M Llama
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common
from common import BENCH, FileClock, RunDir, StageDir, fill_defaults, launch_like_stage, run_harness, write_plan

# (name, what it covers) in time order; each part ends at the next moment of the docstring.
HARNESS_PARTS = [
    ("save: DeepSpeed checkpoint", "engine.save_checkpoint"),
    ("save: gather + digests", "full fp32 weights, weight and optimizer-state digests"),
    ("save: HF write + checksums", "model.safetensors, sha256 of model/ for the manifest"),
    ("exit + orchestrator", "barrier, exit, launcher exit, manifest re-check, next launch"),
    ("relaunch: launcher -> ranks ready", "launcher, imports, process group"),
    ("load", "manifest check, model, data, initialize, checkpoint load, digests"),
    ("first step", "first forward/backward/step and its metrics row"),
]


def watched(first: StageDir, second: StageDir) -> list[Path]:
    """The files whose appearance or lines mark the moments."""
    return [first.metrics, first.checkpoints / "latest", first.model / "model.safetensors", second.deepspeed_env, second.metrics]


def harness_parts(first: StageDir, second: StageDir, clock: FileClock) -> dict[str, float]:
    """Seconds per part of the transition from `first` to `second`."""
    marks = [
        clock.stamps[first.metrics][-1],
        clock.appeared[first.checkpoints / "latest"],
        clock.appeared[first.model / "model.safetensors"],
        json.loads(first.manifest.read_text())["finished"],
        clock.appeared[second.deepspeed_env],
        json.loads(second.rank_record(0).read_text())["time"],
        json.loads(second.started.read_text())["time"],
        clock.stamps[second.metrics][0],
    ]
    return {name: end - start for (name, _), start, end in zip(HARNESS_PARTS, marks, marks[1:])}


def bare_parts(start: float, end: float, stamps: dict[str, float]) -> dict[str, float]:
    """Seconds per part of a bare relaunch (noop_rank.py)."""
    return {
        "launcher -> script": stamps["script_start"] - start,
        "imports (torch, deepspeed)": stamps["imported"] - stamps["script_start"],
        "process group": stamps["ready"] - stamps["imported"],
        "exit": end - stamps["ready"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="steps per phase")
    args = parser.parse_args()
    fill_defaults(args)
    work = common.work_dir("transition")
    print(f"transition: {args.model}, ZeRO-{args.zero}, {args.ranks} {args.accelerator} rank(s), "
          f"micro batch {args.micro_batch} x {args.seq_len}, 2 phases of {args.steps} steps, {args.rounds} rounds; in {work}", flush=True)

    rounds = []
    for r in range(1, args.rounds + 1):
        plan = write_plan(work / f"harness-r{r}", "bench-transition", args,
                          [{"name": "first", "steps": args.steps}, {"name": "second", "steps": args.steps}], port=29500 + 20 * r)
        run = RunDir(work / f"harness-r{r}" / "run")
        first, second = run.stage(0, "first"), run.stage(1, "second")
        with FileClock(watched(first, second)) as clock:
            run_harness(plan, run.root)
        parts = harness_parts(first, second, clock)
        load_mode = json.loads(second.manifest.read_text())["load"]["mode"]
        checkpoint_bytes = sum(p.stat().st_size for p in first.checkpoints.rglob("*") if p.is_file())

        bare_dir = work / f"bare-r{r}"
        bare_dir.mkdir()
        backend = "gloo" if args.accelerator == "cpu" else "nccl"
        start, end = launch_like_stage(second, BENCH / "noop_rank.py", ["--stamps", str(bare_dir / "stamps.json"), "--backend", backend],
                                       bare_dir / "launcher.log", port_from=29800 + 20 * r)
        bare = bare_parts(start, end, json.loads((bare_dir / "stamps.json").read_text()))
        rounds.append({"round": r, "harness": parts, "bare": bare, "load_mode": load_mode, "checkpoint_bytes": checkpoint_bytes})
        print(f"  round {r}: transition {sum(parts.values()):.1f} s ({load_mode}), bare relaunch {sum(bare.values()):.1f} s", flush=True)

    def mean(side: str, name: str) -> float:
        return statistics.mean(x[side][name] for x in rounds)

    harness = {name: mean("harness", name) for name, _ in HARNESS_PARTS}
    bare = {name: mean("bare", name) for name in rounds[0]["bare"]}
    total_h, total_b = sum(harness.values()), sum(bare.values())
    relaunch_h = harness["relaunch: launcher -> ranks ready"]
    relaunch_b = total_b - bare["exit"]
    rows = [[name, f"{harness[name]:.2f}", what] for name, what in HARNESS_PARTS]
    rows += [["harness total", f"{total_h:.2f}", f"{rounds[0]['load_mode']}, checkpoint {rounds[0]['checkpoint_bytes'] / 1e6:,.0f} MB"]]
    rows += [[f"bare: {name}", f"{value:.2f}", "noop_rank.py"] for name, value in bare.items()]
    rows += [["bare total", f"{total_b:.2f}", "launcher start -> launcher exit"]]
    print()
    print(common.table(["part", "seconds", "covers"], rows))
    summary = {"harness": harness, "bare": bare, "harness_total_s": total_h, "bare_total_s": total_b,
               "ratio_total": total_h / total_b, "ratio_relaunch_to_ready": relaunch_h / relaunch_b}
    path = common.save_results("transition", {"settings": vars(args), "rounds": rounds, "summary": summary, "work_dir": str(work)})
    print(f"\ntransition / bare relaunch = {summary['ratio_total']:.2f};  launcher -> ranks ready: harness / bare = "
          f"{summary['ratio_relaunch_to_ready']:.2f};  results: {path}")


if __name__ == "__main__":
    main()
