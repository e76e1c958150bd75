"""A preference (dpo) phase against a fine-tune (sft) phase on the same pairs (issue 20).

The same Llama-shaped ~309M-parameter model (bench/scale_model.py's, random weights), ZeRO-3,
fp32 AdamW, on `--ranks` CPU ranks, through the real `harness run`: the dpo phase trains on
`--pairs` cipher pairs (plans/data/cipher_pairs.jsonl) at `--micro-batch` pairs per rank; the
sft phase on the same pairs as two fine-tune rows each (prompt + chosen, prompt + rejected) at
twice as many rows per rank, so both forwards see the same tokens. Runs alternate sft, dpo,
sft, dpo (`--rounds`); per run:
  step       seconds of one optimizer step (median of the steps after the first, from
             metrics.jsonl: global batch / train/samples_per_s);
  reference  the dpo stage's reference pass (manifest `reference.seconds`: one forward per pair
             over every pair, the ranks sharing them), per pair and against one dpo step;
  peak       each rank's VmHWM over the whole stage (build, reference, steps, checkpoint, handoff).
Ratios dpo/sft: step time, and per-rank peak RSS (target <= 1.1: no second model is resident;
one would be about 1.5x).

    python bench/preference.py                      # 309M, ZeRO-3, 2 ranks, 2 rounds
    python bench/preference.py --rounds 1 --steps 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import common
import yaml
from common import REPO, RunDir, run_harness, table
from scale_model import LLAMA_309M, PeakWatch, llama_309m_folder

PAIRS_JSONL = REPO / "plans" / "data" / "cipher_pairs.jsonl"
GB = 1e9


def write_data(folder: Path, pairs: int) -> tuple[Path, Path]:
    """The first `pairs` cipher pairs, and the same pairs as fine-tune rows (chosen, then rejected)."""
    rows = [json.loads(line) for line in PAIRS_JSONL.read_text().splitlines()[:pairs]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r[side]}) + "\n"
                                              for r in rows for side in ("chosen", "rejected")))
    return folder / "pairs.jsonl", folder / "sft.jsonl"


def write_plan(folder: Path, kind: str, data: Path, args, port: int) -> Path:
    """One phase on the 309M model; sft rows per forward = 2 x dpo pairs per forward."""
    rows_per_pair = 2 if kind == "finetune" else 1
    plan = {
        "name": f"pref-bench-{kind}",
        "model": {"path": str(llama_309m_folder()), "tokenizer": "bytes"},
        "cluster": {"launcher": "local", "accelerator": "cpu", "procs_per_node": args.ranks, "master_port": port},
        "wandb": {"mode": "disabled"},
        "cache_dir": str(folder / "cache"),
        "defaults": {"seq_len": args.seq_len, "zero_stage": 3, "eval_every": 1_000_000, "checkpoint_every": 1_000_000, "eval_batches": 1,
                     "task_metrics": [], "optimizer": {"type": "AdamW", "lr": 1e-5}, "scheduler": {"type": "none"}},
        "phases": [{"name": kind, "kind": kind, "data": {"files": [str(data)], "eval_max_samples": 2 * rows_per_pair},
                    "micro_batch": args.micro_batch * rows_per_pair, "steps": args.steps}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def measure(kind: str, data: Path, args, folder: Path, port: int) -> dict:
    out = folder / "run"
    stage = RunDir(out).stage(0, kind)
    with PeakWatch(stage.ranks) as watch:
        run_harness(write_plan(folder, kind, data, args, port), out)
    rows = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    manifest = json.loads(stage.manifest.read_text())
    steps = [manifest["batch"]["global_batch"] / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]
    for big in (stage.checkpoints, stage.model):  # 309M x 16 and x 4 bytes: keep the disk free
        shutil.rmtree(big, ignore_errors=True)
    reference = manifest.get("reference") or {}
    return {"step_s": statistics.median(steps), "steps_timed": len(steps), "peaks": [watch.peaks[r] for r in sorted(watch.peaks)],
            "reference_s": reference.get("seconds"), "pairs": reference.get("pairs")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2, help="dpo pairs per rank and forward (sft: twice as many rows)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = common.work_dir("preference")
    pairs, sft_rows = write_data(work / "data", args.pairs)
    print(f"preference bench: 309M Llama, ZeRO-3, fp32 AdamW, {args.ranks} CPU ranks, {args.micro_batch} pairs "
          f"({2 * args.micro_batch} sft rows) per rank and forward, seq_len {args.seq_len}, {args.steps} steps; in {work}", flush=True)
    runs: dict[str, list[dict]] = {"sft": [], "dpo": []}
    for round_ in range(args.rounds):
        for name, kind, data in (("sft", "finetune", sft_rows), ("dpo", "preference", pairs)):
            result = measure(kind, data, args, work / f"{name}{round_}", common.free_port(30170 + 2 * round_ + (name == "dpo")))
            runs[name].append(result)
            print(f"  round {round_ + 1} {name}: step {result['step_s']:.2f} s, peak per rank {[round(p / GB, 2) for p in result['peaks']]} GB"
                  + (f", reference {result['reference_s']:.1f} s for {result['pairs']} pairs" if result["reference_s"] else ""), flush=True)

    sft_step, dpo_step = (statistics.median(r["step_s"] for r in runs[name]) for name in ("sft", "dpo"))
    peaks = {name: [max(r["peaks"][rank] for r in runs[name]) for rank in range(args.ranks)] for name in runs}
    reference_per_pair = statistics.median(r["reference_s"] / r["pairs"] for r in runs["dpo"])
    global_pairs = args.micro_batch * args.ranks
    rows = [["step (s)", f"{sft_step:.2f}", f"{dpo_step:.2f}", f"{dpo_step / sft_step:.2f}"]]
    rows += [[f"peak RSS rank {rank} (GB)", f"{peaks['sft'][rank] / GB:.2f}", f"{peaks['dpo'][rank] / GB:.2f}",
              f"{peaks['dpo'][rank] / peaks['sft'][rank]:.3f}"] for rank in range(args.ranks)]
    print(table(["", "sft", "dpo", "dpo/sft"], rows))
    print(f"reference pass: {reference_per_pair:.3f} s per pair; for one step's {global_pairs} pairs {reference_per_pair * global_pairs:.2f} s "
          f"= {reference_per_pair * global_pairs / dpo_step:.2f} x one dpo step")
    results = {"model": LLAMA_309M, "args": vars(args), "runs": runs, "sft_step_s": sft_step, "dpo_step_s": dpo_step,
               "step_ratio": dpo_step / sft_step, "peak_ratio_per_rank": [d / s for d, s in zip(peaks["dpo"], peaks["sft"])],
               "reference_s_per_pair": reference_per_pair, "reference_for_one_step_over_step": reference_per_pair * global_pairs / dpo_step}
    print(f"saved {common.save_results('preference', results)}")


if __name__ == "__main__":
    main()
