"""The per-rank memory estimate `harness plan` shows (harness/stages/memory.py) against the peak each
rank measured, per case, with the ratio measured / estimate (target on CPU: 0.8-1.2 for every case).

Each case is a one-phase pretrain plan run through the real `harness run` (fresh processes, so a
rank's peak is its own): a Llama shape (tiny, small, 61M, 309M), a ZeRO stage, a world size,
offload and activation checkpointing. The estimate is the one stage.json carries; the measured
peak is each rank's VmHWM over the whole stage (build, steps, eval, checkpoint, handoff), from its
memory record (ranks/memory-rank<N>.json), which carries the estimate too.

    python bench/estimate.py                          # every case (about 25 min on 2 cores)
    python bench/estimate.py --models tiny small      # some shapes only
    python bench/estimate.py --only 309m-z3-w2-2x128  # cases by name
    python bench/estimate.py --auto                   # zero_stage/checkpointing auto on the 309M model (the issue's "done when")
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import common
from common import PRETRAIN_TEXT, RunDir, StageFile, run_harness, table

import yaml

from harness.launch.hosts import machine_memory
from harness.launch.setup import model_config
from harness.plan import load_plan
from harness.stages import expand_stages
from harness.stages.fit import MARGIN

GB = 1e9
MODELS = {
    "tiny": {"builtin": "tiny-llama", "tokenizer": "bytes"},
    "small": {"builtin": "small-llama", "tokenizer": "bytes"},
    "61m": common.LLAMA_61M,
    "309m": common.LLAMA_309M,
}


@dataclass(frozen=True)
class Case:
    model: str
    zero: int | str
    world: int
    seq_len: int
    micro_batch: int
    offload: bool = False
    checkpointing: str = "off"
    rank_memory_gb: float | None = None
    """cluster.rank_memory_gb: a smaller machine for the auto settings to fit (--auto)."""
    accelerator: str = "cpu"
    """cuda: the peak compared is GPU memory (torch.cuda.max_memory_allocated, the records' gpu_peak_bytes)."""

    @property
    def name(self) -> str:
        extra = ("-offload" if self.offload else "") + ("" if self.checkpointing == "off" else f"-ckpt-{self.checkpointing}")
        capped = f"-cap{self.rank_memory_gb:.2f}" if self.rank_memory_gb else ""
        return f"{self.model}-z{self.zero}-w{self.world}-{self.micro_batch}x{self.seq_len}{extra}{capped}"


def cases() -> list[Case]:
    """The grid: every ZeRO stage at world size 2 for each shape, world sizes 1 and 4, offload and
    checkpointing (full and selective) where they change the most (long rows: activations dominate)."""
    grid = []
    for model, seq, micro in (("tiny", 256, 8), ("small", 1024, 8), ("61m", 256, 4), ("309m", 128, 2)):
        grid += [Case(model, zero, 2, seq, micro) for zero in (0, 1, 2, 3)]
    grid += [
        Case("tiny", 2, 1, 256, 8), Case("tiny", 3, 4, 256, 8), Case("tiny", 2, 2, 256, 8, offload=True),
        Case("small", 2, 2, 1024, 8, checkpointing="full"), Case("small", 2, 2, 1024, 8, checkpointing="selective"),
        Case("small", 3, 2, 1024, 8, checkpointing="full"), Case("small", 0, 1, 1024, 8), Case("small", 3, 4, 1024, 8),
        Case("61m", 2, 2, 256, 4, checkpointing="full"), Case("61m", 2, 2, 256, 4, offload=True), Case("61m", 3, 4, 256, 4),
        Case("61m", 1, 1, 256, 4),
        Case("309m", 3, 1, 128, 2), Case("309m", 3, 4, 128, 2), Case("309m", 3, 2, 128, 2, checkpointing="full"),
        Case("309m", 3, 2, 128, 2, offload=True),
    ]
    return grid


def model_block(name: str) -> dict:
    if name in ("tiny", "small"):
        return MODELS[name]
    return {"path": str(common.random_llama_folder(f"llama-{name}", MODELS[name])), "tokenizer": "bytes"}


def write_plan(folder, case: Case, port: int):
    settings = {"seq_len": case.seq_len, "micro_batch": case.micro_batch, "zero_stage": case.zero, "steps": 2,
                "activation_checkpointing": case.checkpointing, "offload": {"optimizer": case.offload},
                "eval_every": 1_000_000, "checkpoint_every": 1_000_000, "eval_batches": 1,
                "optimizer": {"type": "AdamW", "lr": 1e-4}, "scheduler": {"type": "none"}}
    cluster = {"launcher": "local", "accelerator": case.accelerator, "procs_per_node": case.world, "master_port": port}
    if case.rank_memory_gb:
        cluster["rank_memory_gb"] = case.rank_memory_gb
    plan = {"name": "estimate", "model": model_block(case.model), "cluster": cluster,
            "wandb": {"mode": "disabled"}, "defaults": settings,
            "phases": [{"name": "train", "kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}}]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def measure(case: Case, work, port: int) -> dict:
    """Run the case; its estimate (stage.json) and every rank's peak (memory records)."""
    out = work / case.name / "run"
    plan = write_plan(out.parent, case, common.free_port(port))
    started = time.time()
    run_harness(plan, out)
    stage = RunDir(out).stage(0, "train")
    memory = StageFile.read(stage.stage_json).stage.memory
    estimate = memory.estimate if memory else None
    records = [json.loads(stage.rank_memory(rank).read_text()) for rank in range(case.world)]
    peak_of = "gpu_peak_bytes" if case.accelerator == "cuda" else "peak_rss_bytes"
    peaks = [max(m.get(peak_of, 0) for m in r["milestones"].values()) for r in records]
    manifest = json.loads(stage.manifest.read_text())
    for big in (stage.checkpoints, stage.model):  # up to 16 bytes a parameter: keep the disk free, the records stay
        shutil.rmtree(big, ignore_errors=True)
    return {"case": case.__dict__, "name": case.name, "seconds": time.time() - started, "estimate_bytes": estimate.total_bytes if estimate else None,
            "estimate": estimate.model_dump() if estimate else None, "record_estimate_bytes": records[0].get("estimate_bytes"), "peaks": peaks,
            "milestones": [r["milestones"] for r in records], "ran": manifest.get("fast", {}).get("activation_checkpointing"),
            "zero_stage": manifest["engine"]["zero_stage"], "decisions": [d.model_dump() for d in memory.decisions] if memory else []}


def planned_estimate(case: Case, folder) -> int:
    """The estimate `harness plan` gives a case, computed in this process (the launch side is pure)."""
    plan = load_plan(write_plan(folder, case, 30500))
    (stage,) = expand_stages(plan, "cpu", count_train_rows=lambda spec: 0, model_config=model_config(plan.model), wandb_mode="disabled",
                             machine=machine_memory())
    return stage.memory.estimate.total_bytes


def auto_cases(work) -> tuple[list[Case], Case]:
    """--auto, the 309M model on 2 ranks with zero_stage and activation_checkpointing auto: as this
    machine has it; under a rank memory only ZeRO-3 with full checkpointing fits (halfway between its
    estimate and the next smallest, plus the margin); and under one nothing fits (refused)."""
    fixed = {(zero, ckpt): planned_estimate(Case("309m", zero, 2, 128, 2, checkpointing=ckpt), work / "estimates" / f"z{zero}-{ckpt}")
             for zero in (0, 1, 2, 3) for ckpt in ("off", "full")}
    only = fixed.pop((3, "full"))
    cap = (only + min(fixed.values())) / 2 * (1 + MARGIN) / GB
    auto = Case("309m", "auto", 2, 128, 2, checkpointing="auto")
    return [auto, Case("309m", "auto", 2, 128, 2, checkpointing="auto", rank_memory_gb=round(cap, 3))], \
        Case("309m", "auto", 2, 128, 2, checkpointing="auto", rank_memory_gb=round(0.8 * only / GB, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--only", nargs="+", default=None, help="case names (see the table) to run")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="cuda: compare with each rank's GPU peak (not --auto)")
    parser.add_argument("--auto", action="store_true", help="the 309M model with zero_stage and checkpointing auto: uncapped, capped, refused")
    args = parser.parse_args()
    work = common.work_dir("estimate")
    chosen = [dataclasses.replace(c, accelerator=args.accelerator) for c in cases() if c.model in args.models and (args.only is None or c.name in args.only)]
    if args.auto:
        chosen, refused = auto_cases(work)
        plan = write_plan(work / refused.name, refused, 30500)
        shown = subprocess.run([sys.executable, "-m", "harness.cli", "plan", str(plan), "--out", str(work / refused.name / "run")],
                               capture_output=True, text=True)
        print(f"{refused.name}: harness plan exit {shown.returncode}\n{shown.stderr.strip()}", flush=True)
    print(f"estimate vs measured: {len(chosen)} case(s); in {work}", flush=True)
    results, rows = [], []
    for k, case in enumerate(chosen):
        result = measure(case, work, 30500 + 10 * (k % 8))
        results.append(result)
        estimate, peak = result["estimate_bytes"], max(result["peaks"])
        ratio = f"{peak / estimate:.2f}" if estimate else "-"
        rows.append([case.name, f"{estimate / GB:.2f}" if estimate else "-", " / ".join(f"{p / GB:.2f}" for p in result["peaks"]), ratio])
        print(f"  {case.name}: estimate {rows[-1][1]} GB, measured {rows[-1][2]} GB, measured/estimate {ratio} ({result['seconds']:.0f} s)", flush=True)
        for decision in result["decisions"]:
            print(f"    {decision['field']} auto -> {decision['value']}: {decision['reason']}", flush=True)
    print(table(["case", "estimate GB", "measured peak GB per rank", "measured / estimate"], rows))
    print(f"saved {common.save_results('estimate', {'cases': results})}")


if __name__ == "__main__":
    main()
