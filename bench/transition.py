"""Phase transition time of the harness (end of phase 1's last step -> phase 2's first step),
split into parts, beside a bare relaunch of the same launcher (the baseline, same run).

Each round runs a two-phase plan with `python -m harness.cli run` (both phases alike, so
phase 2 takes the full_state path: DeepSpeed checkpoint with optimizer moments), then
bench/noop_rank.py under phase 2's exact launcher command. The harness is not changed or
instrumented: the parts come from what it writes anyway, all on this machine's wall clock:

  end of training  phase 1 metrics.jsonl mtime (its last row, after the final eval)
  DeepSpeed ckpt   newest file under phase 1 checkpoints/
  HF model         newest file under phase 1 model/    (full-weight gather + safetensors)
  manifest         phase 1 manifest.json mtime         (checksums of model/ + atomic write)
  launcher start   phase 2 .deepspeed_env mtime        (written just before the launcher starts)
  ranks ready      phase 2 ranks/rank0.json "time"     (after imports and process-group init)
  loaded           phase 2 started.json "time"         (model, data, initialize, checkpoint load, digests)
  first step       arrival of phase 2's first metrics row (LineClock)

    python bench/transition.py                                  # CPU: tiny-llama, 2 ranks, ZeRO-2
    python bench/transition.py --accelerator cuda --rounds 1    # 1 GPU, bf16, ~370M Llama
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common
from common import BENCH, LineClock, RunDir, StageDir, fill_defaults, launch_like_stage, run_harness, write_plan

# (name, what it covers) in time order; each part ends at its own timestamp.
HARNESS_PARTS = [
    ("save: DeepSpeed checkpoint", "engine.save_checkpoint"),
    ("save: HF model", "full-weight gather, digests, safetensors"),
    ("save: manifest", "sha256 of model/, atomic write"),
    ("exit + orchestrator", "barrier, exit, launcher exit, manifest re-check, next launch"),
    ("relaunch: launcher -> ranks ready", "launcher, imports, process group"),
    ("load", "manifest check, model, data, initialize, checkpoint load, digests"),
    ("first step", "first forward/backward/step and its metrics row"),
]


def newest_mtime(folder: Path) -> float:
    return max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())


def harness_parts(first: StageDir, second: StageDir, first_row_arrival: float) -> dict[str, float]:
    """Seconds per part of the transition from `first` to `second`, from the files they hold."""
    marks = [
        first.metrics.stat().st_mtime,
        newest_mtime(first.checkpoints),
        newest_mtime(first.model),
        first.manifest.stat().st_mtime,
        (second.root / ".deepspeed_env").stat().st_mtime,
        json.loads((second.ranks / "rank0.json").read_text())["time"],
        json.loads((second.root / "started.json").read_text())["time"],
        first_row_arrival,
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
        with LineClock([second.metrics]) as clock:
            run_harness(plan, run.root)
        parts = harness_parts(first, second, clock.stamps[second.metrics][0])
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
