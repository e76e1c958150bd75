"""Run by tests/test_fast.py in its own process (it starts a one-rank process group): the loss of
one fixed batch from the same seeded tiny Llama on a fresh one-rank DeepSpeed engine (ZeRO-2, CPU),
three ways: eager, compiled, and compiled with no working C++ compiler for inductor. Prints the
FastPath warnings, then one JSON line with the three losses and the broken run's FastRecord."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_plan, pretrain_phase  # noqa: E402
from harness.stages.ds_config import get_train_ds_config  # noqa: E402
from harness.plan import BUILTIN_CONFIGS, parse_plan  # noqa: E402
from harness.launch.processes import free_port  # noqa: E402
from harness.stages import expand_stages  # noqa: E402
from harness.worker.fast import FastPath  # noqa: E402
from harness.worker.objectives import RANK_OBJECTIVES  # noqa: E402
from harness.worker.model import build_model, byte_tokenizer  # noqa: E402
from harness.worker.strategy import DeepSpeedStrategy, release_memory  # noqa: E402


def first_loss(fast) -> tuple[float, dict]:
    plan = make_plan("fallback", [pretrain_phase("p", fast=fast, zero_stage=2)], port=29500, procs=1)
    (stage,) = expand_stages(parse_plan(plan, REPO), "cpu", count_train_rows=lambda spec: 760, model_config=BUILTIN_CONFIGS["tiny-llama"], wandb_mode="disabled")
    strategy = DeepSpeedStrategy(stage, get_train_ds_config(stage))
    tokenizer = byte_tokenizer()
    model = build_model(stage.model, tokenizer, stage.settings.seed, None)
    path = FastPath(stage, is_rank0=True)
    path.prepare_model(model)
    strategy.setup(model)
    path.compile(strategy.engine)
    ids = torch.randint(0, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    loss = float(strategy.train_micro_step(functools.partial(RANK_OBJECTIVES["pretrain"].loss, settings=stage.settings), {"input_ids": ids, "labels": ids}, forward_guard=path.first_forward)[0])
    record = path.record().model_dump()
    strategy.close()
    del model
    release_memory()
    torch._dynamo.reset()
    return loss, record


def main() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port(29950)))
    eager, _ = first_loss("off")
    compiled, _ = first_loss({"compile": True})
    # Inductor builds its CPU kernels with this compiler; nothing may come from its caches.
    torch._inductor.config.cpp.cxx = (None, "/bin/false")
    torch._inductor.config.fx_graph_cache = False
    broken, record = first_loss({"compile": True})
    print(json.dumps({"eager": eager, "compiled": compiled, "broken": broken, "broken_record": record}), flush=True)
    os._exit(0)  # as the worker does: no interpreter teardown of the process group


if __name__ == "__main__":
    main()
