"""LoRA against full fine-tuning on the 309M Llama shape, 2 CPU ranks, fp32 (issue 21).

Each case trains the same few steps on the same batch through the real `harness run`:
  full-z3   every parameter, ZeRO-3 (the baseline)
  lora-z3   LoRA r=16 on every linear layer (trainable.adapter), ZeRO-3
  lora-z2   the same adapter at ZeRO-2 (every rank holds the whole frozen base)
Per rank: peak RSS (VmHWM, sampled from /proc over the whole stage: build, steps, checkpoint,
merged handoff); the step time is the median of the steps after the first. Ratios are against
full-z3 of the same invocation. On a shared machine each case takes the shared heavy lock
(/tmp/harness-heavy.lock) for itself, so the cases are measured alone.

    python bench/lora.py                       # all three cases, 4 steps each
    python bench/lora.py --cases full-z3 lora-z3 --steps 3
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import common
from common import PRETRAIN_TEXT, RunDir, run_harness, table
from scale_model import GB, PeakWatch, _param_count, llama_309m_folder

import yaml

LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": ["all-linear"]}
CASES = {"full-z3": (3, None), "lora-z3": (3, LORA), "lora-z2": (2, LORA)}
LOCK = Path("/tmp/harness-heavy.lock")


def write_plan(folder: Path, case: str, steps: int, port: int) -> Path:
    zero, adapter = CASES[case]
    trainable = {"trainable": {"adapter": adapter}} if adapter else {}
    plan = {
        "name": f"lora-{case}",
        "model": {"path": str(llama_309m_folder()), "tokenizer": "bytes"},
        "cluster": {"launcher": "local", "accelerator": "cpu", "procs_per_node": 2, "master_port": port},
        "wandb": {"mode": "disabled"},
        "defaults": {"seq_len": 64, "micro_batch": 1, "zero_stage": zero, "eval_every": 1_000_000, "checkpoint_every": 1_000_000,
                     "eval_batches": 1, "task_metrics": [], "optimizer": {"type": "AdamW", "lr": 1e-4}, "scheduler": {"type": "none"}},
        "phases": [{"name": "train", "kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, "steps": steps, **trainable}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@contextmanager
def heavy_lock():
    """The machine's shared lock for heavy runs, held for one case."""
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_seconds(stage) -> list[float]:
    """Seconds of each logged step: global batch / samples per second."""
    rows = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    return [2 / row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row]  # global batch: 1 x 1 x 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    folder = llama_309m_folder()
    params = _param_count(folder)
    work = common.work_dir("lora")
    print(f"lora: {folder.name} ({params / 1e6:.0f}M), 2 ranks, fp32 AdamW, micro batch 1 x 64 tokens, {args.steps} steps; in {work}", flush=True)
    results = {}
    for case in args.cases:
        out = work / case / "run"
        plan = write_plan(out.parent, case, args.steps, common.free_port(30460))
        stage = RunDir(out).stage(0, "train")
        with heavy_lock():
            started = time.time()
            with PeakWatch(stage.ranks) as watch:
                run_harness(plan, out)
            seconds = time.time() - started
        steps = step_seconds(stage)
        trainable = json.loads(stage.manifest.read_text())["trainable"]
        results[case] = {"peak_bytes": [watch.peaks[r] for r in sorted(watch.peaks)], "step_s": statistics.median(steps[1:] or steps),
                         "steps_s": steps, "seconds": seconds, "trainable_params": trainable["trainable_params"]}
        print(f"  {case}: peak per rank {[round(p / GB, 2) for p in results[case]['peak_bytes']]} GB, step {results[case]['step_s']:.2f} s, "
              f"{seconds:.0f} s in all", flush=True)
        for big in (stage.checkpoints, stage.model, stage.adapter):  # GBs of checkpoint and handoff: the records stay
            shutil.rmtree(big, ignore_errors=True)

    base = results.get("full-z3")
    rows = []
    for case, r in results.items():
        peak = max(r["peak_bytes"])
        rows.append([case, f"{r['trainable_params']:,}", " / ".join(f"{p / GB:.2f}" for p in r["peak_bytes"]),
                     f"{peak / max(base['peak_bytes']):.2f}" if base else "-", f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}" if base else "-"])
    print(table(["case", "trainable", "peak GB (rank 0 / 1)", "peak / full-z3", "step s", "step / full-z3"], rows))
    if "lora-z2" in results and "lora-z3" in results:
        z2, z3 = results["lora-z2"]["step_s"], results["lora-z3"]["step_s"]
        print(f"LoRA step time ZeRO-2 / ZeRO-3: {z2 / z3:.2f} ({'ZeRO-2' if z2 < z3 else 'ZeRO-3'} is faster here)")
    print(f"saved {common.save_results('lora', {'model': folder.name, 'params': params, 'steps': args.steps, 'cases': results})}")


if __name__ == "__main__":
    main()
