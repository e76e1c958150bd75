"""The baseline of bench/throughput.py: a minimal DeepSpeed training loop, one process per rank.

bench/throughput.py starts it with the same `deepspeed` launcher command and rank environment
as a harness stage, and hands it that stage's stage.json (for the model, data file and batch
shape) and ds_config.json. What stays the same as the harness worker: the model (built by
harness.worker.model), the DeepSpeed config, packed blocks of seq_len tokens, the micro batch
and accumulation. What is left out: eval, checkpoints, the handoff, metrics beyond one JSON
line per step, and every sync except one `loss.item()` per step (it ends the timed work).
Two flags add back what the worker does differently, to find where a gap comes from:
--attention-mask passes the all-ones mask of packed blocks, --sync-micro-step reads each
micro step's loss (a device sync) before engine.step().

    deepspeed ... bench/raw_loop.py --stage S/stage.json --ds-config S/ds_config.json --steps 30 --metrics m.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch

from harness.stages import Stage
from harness.worker.model import build_model, build_tokenizer


def packed_blocks(tokenizer, text_file: str, seq_len: int) -> np.ndarray:
    """The whole file as one token stream cut into [n, seq_len] blocks (the harness also packs)."""
    ids = tokenizer(Path(text_file).read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=Path, required=True)
    parser.add_argument("--ds-config", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="rank 0 writes one JSON line per step here")
    parser.add_argument("--attention-mask", action="store_true", help="pass an all-ones attention_mask, as the worker does")
    parser.add_argument("--sync-micro-step", action="store_true", help="loss.item() after each backward, before engine.step(), as the worker does")
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    args = parser.parse_args()

    stage = Stage.model_validate(json.loads(args.stage.read_text())["stage"])
    s = stage.settings
    deepspeed.init_distributed(dist_backend="gloo" if stage.accelerator == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(deepspeed.get_accelerator().current_device_name())

    tokenizer = build_tokenizer(stage.model, None)
    model = build_model(stage.model, tokenizer, s.seed, None)
    params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=json.loads(args.ds_config.read_text()))
    blocks = packed_blocks(tokenizer, stage.data.sets["pretrain"].files[0], s.seq_len)

    micro, accum = stage.micro_batch, stage.grad_accum
    tokens_per_step = micro * accum * world * s.seq_len
    log = open(args.metrics, "w") if rank == 0 else None
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        for a in range(accum):
            first = (((step - 1) * accum + a) * world + rank) * micro % (len(blocks) - micro)
            ids = torch.from_numpy(blocks[first : first + micro]).to(device)
            mask = {"attention_mask": torch.ones_like(ids)} if args.attention_mask else {}
            loss = engine(input_ids=ids, labels=ids, **mask).loss
            engine.backward(loss)
            if args.sync_micro_step:
                loss.item()
        engine.step()
        loss_value = loss.item()
        elapsed = time.perf_counter() - started
        if log:
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            log.write(json.dumps({"stage_step": step, "train/loss": loss_value, "train/tokens_per_s": tokens_per_step / elapsed, "params": params,
                                  "gpu_peak_bytes": peak}) + "\n")
            log.flush()
    dist.barrier()
    os._exit(0)  # as the worker does: skip interpreter teardown (DESIGN.md: rare exit 250 otherwise)


if __name__ == "__main__":
    main()
