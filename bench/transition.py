"""Stage transition time (end of stage 1's last step -> stage 2's first step), split into parts,
for both ways a stage can start: swapping the engine inside the running ranks (the default,
cluster.transitions: swap) and a relaunch (cluster.transitions: relaunch), each also with both
stages compiled (fast: {compile: true}); beside a bare relaunch of the same launcher (the
baseline), all in the same run, alternated per round. Compilation's cost is the first step's:
stage 1's (the launch's first compiled forward) and stage 2's (after a swap dynamo reuses what the
process compiled for stage 1; after a relaunch inductor's on-disk cache is warm).

Each round runs a two-stage plan with `python -m harness.cli run` (both stages alike, so
stage 2 takes the full_state path: DeepSpeed checkpoint with optimizer moments), once per way,
then bench/noop_rank.py under stage 2's exact launcher command. The harness is not
instrumented for this: each part ends at a moment the harness leaves behind anyway, on this
machine's wall clock. Moments marked * are seen by polling (common.FileClock); the others are
times the harness writes itself.

  end of training   * stage 1's last metrics row (written after the final eval)
  DeepSpeed ckpt    * checkpoints/latest appears (DeepSpeed writes it after the checkpoint)
  manifest            manifest.json "finished" (HF model written and checksummed, digests taken)
  stage 2 began       stage 2 ranks/rank0.json "time" (swap: engine torn down, next stage read;
                      relaunch: ranks exited, launcher exited, orchestrator, new launcher, imports,
                      process group)
  engine ready        stage 2 "initialized" memory milestone (model built, data opened, deepspeed.initialize)
  loaded              stage 2 started.json "time" (checkpoint loaded, weights and moments digested)
  first step        * stage 2's first metrics row

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

WAYS = ("swap", "relaunch", "swap+compile", "relaunch+compile")
COMPILED = {"swap+compile": {"compile": True}, "relaunch+compile": {"compile": True}}
"""The fast setting of both stages per way (the others take --fast)."""
# (name, what it covers) in time order; each part ends at the next moment of the docstring.
PARTS = [
    ("save: DeepSpeed checkpoint", "engine.save_checkpoint, file checksums"),
    ("save: HF model + manifest", "gather, safetensors, digests, manifest"),
    ("teardown / relaunch", "swap: engine torn down; relaunch: exit, orchestrator, launcher, imports, process group"),
    ("next init", "model built, data opened, deepspeed.initialize"),
    ("load", "checkpoint load, weight and moment digests"),
    ("first step", "first forward/backward/step and its metrics row"),
]


def watched(first: StageDir, second: StageDir) -> list[Path]:
    """The files whose appearance or lines mark the moments."""
    return [first.metrics, first.checkpoints / "latest", second.metrics]


def transition_parts(first: StageDir, second: StageDir, clock: FileClock) -> dict[str, float]:
    """Seconds per part of the transition from `first` to `second`."""
    marks = [
        clock.stamps[first.metrics][-1],
        clock.appeared[first.checkpoints / "latest"],
        json.loads(first.manifest.read_text())["finished"],
        json.loads(second.rank_record(0).read_text())["time"],
        json.loads(second.rank_memory(0).read_text())["milestones"]["initialized"]["time"],
        json.loads(second.started.read_text())["time"],
        clock.stamps[second.metrics][0],
    ]
    return {name: end - start for (name, _), start, end in zip(PARTS, marks, marks[1:])}


def first_step_seconds(stage: StageDir) -> float:
    """The stage's first step, from its metrics row (its samples / samples per second)."""
    row = json.loads(stage.metrics.read_text().splitlines()[0])
    return json.loads(stage.stage_json.read_text())["stage"]["global_batch"] / row["train/samples_per_s"]


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
    parser.add_argument("--steps", type=int, default=10, help="steps per stage")
    args = parser.parse_args()
    fill_defaults(args)
    work = common.work_dir("transition")
    print(f"transition: {args.model}, ZeRO-{args.zero}, {args.ranks} {args.accelerator} rank(s), "
          f"micro batch {args.micro_batch} x {args.seq_len}, 2 stages of {args.steps} steps, {args.rounds} rounds; in {work}", flush=True)

    rounds = []
    for r in range(1, args.rounds + 1):
        result = {"round": r}
        for k, way in enumerate(WAYS if r % 2 else reversed(WAYS)):
            folder = work / f"{way}-r{r}"
            fast = {"fast": COMPILED[way]} if way in COMPILED else {}
            plan = write_plan(folder, "bench-transition", args, [{"name": "first", "steps": args.steps, **fast}, {"name": "second", "steps": args.steps, **fast}],
                              port=29500 + 50 * r + 10 * k, transitions=way.split("+")[0])
            run = RunDir(folder / "run")
            first, second = run.stage(0, "first"), run.stage(1, "second")
            with FileClock(watched(first, second)) as clock:
                run_harness(plan, run.root)
            result[way] = transition_parts(first, second, clock)
            result[f"{way} stage 1 first step"] = first_step_seconds(first)
            result["load_mode"] = json.loads(second.manifest.read_text())["load"]["mode"]
            result["checkpoint_bytes"] = sum(p.stat().st_size for p in first.checkpoints.rglob("*") if p.is_file())
        bare_dir = work / f"bare-r{r}"
        bare_dir.mkdir()
        backend = "gloo" if args.accelerator == "cpu" else "nccl"
        start, end = launch_like_stage(second, BENCH / "noop_rank.py", ["--stamps", str(bare_dir / "stamps.json"), "--backend", backend],
                                       bare_dir / "launcher.log", port_from=29800 + 20 * r)
        result["bare"] = bare_parts(start, end, json.loads((bare_dir / "stamps.json").read_text()))
        rounds.append(result)
        print(f"  round {r}: " + ", ".join(f"{way} {sum(result[way].values()):.1f} s" for way in WAYS)
              + f" ({result['load_mode']}), bare relaunch {sum(result['bare'].values()):.1f} s", flush=True)

    def mean(side: str, name: str) -> float:
        return statistics.mean(x[side][name] for x in rounds)

    ways = {way: {name: mean(way, name) for name, _ in PARTS} for way in WAYS}
    bare = {name: mean("bare", name) for name in rounds[0]["bare"]}
    totals = {way: sum(parts.values()) for way, parts in ways.items()}
    total_bare = sum(bare.values())
    rows = [[name, *(f"{ways[way][name]:.2f}" for way in WAYS), what] for name, what in PARTS]
    rows += [["total", *(f"{totals[way]:.2f}" for way in WAYS), f"{rounds[0]['load_mode']}, checkpoint {rounds[0]['checkpoint_bytes'] / 1e6:,.0f} MB"]]
    rows += [[f"bare: {name}", f"{value:.2f}", "", "", "", "noop_rank.py"] for name, value in bare.items()]
    rows += [["bare relaunch total", f"{total_bare:.2f}", "", "", "", "launcher start -> launcher exit"]]
    print()
    print(common.table(["part", *(f"{way} s" for way in WAYS), "covers"], rows))
    first_steps = {way: {"stage 1": statistics.mean(x[f"{way} stage 1 first step"] for x in rounds), "stage 2": ways[way]["first step"]} for way in WAYS}
    compile_cost = {f"{way}, {stage}": first_steps[f"{way}+compile"][stage] - first_steps[way][stage]
                    for way in ("swap", "relaunch") for stage in ("stage 1", "stage 2")}
    summary = {"ways": ways, "bare": bare, "totals_s": totals, "bare_total_s": total_bare,
               "ratio_to_bare": {way: totals[way] / total_bare for way in WAYS}, "first_step_s": first_steps, "compile_cost_s": compile_cost}
    print("\ncompilation's cost, first step compiled - eager: " + ";  ".join(f"{where} {cost:.2f} s" for where, cost in compile_cost.items()))
    path = common.save_results("transition", {"settings": vars(args), "rounds": rounds, "summary": summary, "work_dir": str(work)})
    print("\n" + ";  ".join(f"{way} / bare relaunch = {summary['ratio_to_bare'][way]:.2f}" for way in WAYS) + f";  results: {path}")


if __name__ == "__main__":
    main()
