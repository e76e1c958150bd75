"""Per-rank peak host memory of a ZeRO-3 stage against world size (issue 8, the model side).

A Llama-shaped ~309M-parameter local Hugging Face folder (random weights, written once under
bench/out/) trains a few steps with fp32 AdamW under ZeRO-3 on CPU at world size 1, 2 and 4,
through the real `harness run`. For each rank:
  peak      VmHWM of the rank process over the whole stage (build, steps, checkpoint, handoff),
            sampled from /proc by this process (works for any version of the harness);
  baseline  its RSS before the model is built (ranks/memory-rank<N>.json `before_model`; absent before
            the change: then the same world size's figure from --baseline-from is used);
  target    1.3 x (16 bytes x params / world + baseline): fp32 weights, gradients and two Adam
            moments, sharded, plus what the rank holds without a model.

    python bench/scale_model.py                         # world 1, 2, 4
    python bench/scale_model.py --worlds 1 2 --harness-repo /tmp/before --baseline-from bench/out/scale_model-latest.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import common
from common import PRETRAIN_TEXT, Poller, RunDir, run_harness, table

import yaml

GB = 1e9


def llama_309m_folder() -> Path:
    return common.random_llama_folder("llama-309m", common.LLAMA_309M)


def write_plan(folder: Path, world: int, steps: int, port: int, deepspeed: dict) -> Path:
    plan = {
        "name": f"scale-w{world}",
        "model": {"path": str(llama_309m_folder()), "tokenizer": "bytes"},
        "cluster": {"launcher": "local", "accelerator": "cpu", "procs_per_node": world, "master_port": port},
        "wandb": {"mode": "disabled"},
        "defaults": {"seq_len": 64, "micro_batch": 1, "zero_stage": 3, "eval_every": 1_000_000, "checkpoint_every": 1_000_000,
                     "eval_batches": 1, "optimizer": {"type": "AdamW", "lr": 1e-4}, "scheduler": {"type": "none"}, "deepspeed": deepspeed},
        "phases": [{"name": "train", "kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, "steps": steps}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


class PeakWatch(Poller):
    """Samples VmHWM of every rank process (pids from ranks/rank<N>.json) until it exits."""

    def __init__(self, ranks_dir: Path):
        super().__init__(0.1)
        self.ranks_dir, self.peaks = ranks_dir, {}

    def poll(self) -> None:
        for path in self.ranks_dir.glob("rank*.json"):
            try:
                info = json.loads(path.read_text())
                status = Path(f"/proc/{info['pid']}/status").read_text()
            except (OSError, ValueError):
                continue
            hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), 0)  # 0: exiting
            self.peaks[info["rank"]] = max(self.peaks.get(info["rank"], 0), hwm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--harness-repo", type=Path, default=None, help="run the harness from this checkout (e.g. a worktree of an older commit)")
    parser.add_argument("--baseline-from", type=Path, default=None, help="a result JSON whose baselines to use where ranks record none")
    parser.add_argument("--label", default="after")
    parser.add_argument("--deepspeed", type=json.loads, default={}, help="raw DeepSpeed config (JSON) merged into every stage's")
    args = parser.parse_args()
    if args.harness_repo:
        os.environ["PYTHONPATH"] = str(args.harness_repo.resolve())
    known = json.loads(args.baseline_from.read_text())["worlds"] if args.baseline_from else {}
    folder = llama_309m_folder()
    params = _param_count(folder)
    work = common.work_dir("scale_model")
    print(f"scale_model ({args.label}): {folder.name}, ZeRO-3, fp32 AdamW, {args.steps} steps, world {args.worlds}; in {work}", flush=True)

    results, rows = {}, []
    for world in args.worlds:
        out = work / f"w{world}" / "run"
        plan = write_plan(out.parent, world, args.steps, common.free_port(29900 + 10 * world), args.deepspeed)
        stage = RunDir(out).stage(0, "train")
        started = time.time()
        with PeakWatch(stage.ranks) as watch:
            run_harness(plan, out)
        records = {rank: json.loads(stage.rank_memory(rank).read_text())["milestones"] if stage.rank_memory(rank).exists() else {} for rank in range(world)}
        per_rank = []
        for rank in sorted(records):
            r = records[rank]
            baseline = r.get("before_model", {}).get("rss_bytes") or known.get(str(world), {}).get("ranks", [{}] * world)[rank].get("baseline_bytes")
            peak = max(watch.peaks.get(rank, 0), r.get("end", {}).get("peak_rss_bytes", 0))
            target = 1.3 * (16 * params / world + baseline) if baseline else None
            per_rank.append({"rank": rank, "peak_bytes": peak, "baseline_bytes": baseline, "target_bytes": target,
                             "ratio": peak / target if target else None, "storage": r.get("model_built", {}).get("parameters")})
            rows.append([args.label, world, rank, f"{peak / GB:.2f}", f"{baseline / GB:.2f}" if baseline else "-",
                         f"{target / GB:.2f}" if target else "-", f"{peak / target:.2f}" if target else "-"])
        results[str(world)] = {"params": params, "seconds": time.time() - started, "ranks": per_rank}
        print(f"  world {world}: peak per rank {[round(x['peak_bytes'] / GB, 2) for x in per_rank]} GB ({time.time() - started:.0f} s)", flush=True)
        for big in (stage.checkpoints, stage.model):  # 309M x 16 bytes and x 4: keep the disk free, the records stay
            shutil.rmtree(big, ignore_errors=True)

    print(table(["version", "world", "rank", "peak GB", "baseline GB", "target GB", "peak/target"], rows))
    print(f"saved {common.save_results(f'scale_model-{args.label}', {'label': args.label, 'model': common.LLAMA_309M, 'steps': args.steps, 'worlds': results})}")


def _param_count(folder: Path) -> int:
    """Parameters of the folder's safetensors, from the headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    main()
