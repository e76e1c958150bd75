"""Run by tests/test_memory.py under the real `deepspeed` launcher (2 CPU ranks, gloo): one forward and
backward of the same seeded tiny Llama on a fixed batch (each rank its own rows), for every ZeRO stage
with activation checkpointing off, full and selective (every 2nd of its 2 layers), and with frozen
parameters and compilation. Each case builds its engine the way a stage does (Stage -> DeepSpeed
config -> FastPath, which applies the checkpointing -> DeepSpeedStrategy). Rank 0 prints one JSON
line: per case the loss averaged over the ranks, what FastPath recorded as run, and against its
reference case (the same settings with checkpointing off) the largest difference of any gradient
element and the largest gradient element. Gradients are DeepSpeed's full fp32 ones of every trained
parameter (safe_get_full_grad: reduced over the ranks, gathered from the ZeRO partitions)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_plan, pretrain_phase  # noqa: E402
from harness.plan import BUILTIN_CONFIGS, parse_plan  # noqa: E402
from harness.stages import expand_stages  # noqa: E402
from harness.stages.ds_config import get_train_ds_config  # noqa: E402
from harness.worker.fast import FastPath  # noqa: E402
from harness.worker.model import build_model, byte_tokenizer  # noqa: E402
from harness.worker.objectives import RANK_OBJECTIVES  # noqa: E402
from harness.worker.strategy import DeepSpeedStrategy, release_memory  # noqa: E402

# name -> (phase settings, the case it must equal): the same model and batch; only the name's settings differ.
CASES = {f"z{zero}-{mode}": ({"zero_stage": zero, "activation_checkpointing": mode}, f"z{zero}-off")
         for zero in (0, 1, 2, 3) for mode in ("off", "full", "selective")}
FROZEN = {"train": ["layers[-1:]", "head"]}
CASES.update({"z3-frozen-off": ({"zero_stage": 3, "trainable": FROZEN}, "z3-frozen-off"),
              "z3-frozen-full": ({"zero_stage": 3, "trainable": FROZEN, "activation_checkpointing": "full"}, "z3-frozen-off"),
              "z2-compiled-full": ({"zero_stage": 2, "activation_checkpointing": "full", "fast": {"compile": True}}, "z2-off")})


def one_step(settings: dict, table, folder: Path) -> tuple[float, dict[str, torch.Tensor], dict, list[int]]:
    """(loss averaged over the ranks, full gradients by name, FastRecord, forwards of each decoder
    layer's MLP) of one micro step of the model saved in `folder`, loaded as a stage loads a handoff
    (from_pretrained: it comes in eval mode, where transformers would not recompute)."""
    plan = make_plan("ckpt", [pretrain_phase("p", fast=settings.pop("fast", "off"), **settings)], port=30500)
    (stage,) = expand_stages(parse_plan(plan, REPO), "cpu", count_train_rows=lambda spec: 760, model_config=BUILTIN_CONFIGS["tiny-llama"],
                             model_params=lambda adapter: table, wandb_mode="disabled")
    strategy = DeepSpeedStrategy(stage, get_train_ds_config(stage))
    tokenizer = byte_tokenizer()
    model = build_model(stage.model, tokenizer, stage.settings.seed, folder)
    # The MLP runs inside the layer's checkpointed forward: once per step, twice when recomputed
    # (transformers checkpoints forward, not __call__, so hooks on the layer itself fire once).
    forwards = [0] * len(model.model.layers)
    for k, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, k=k: forwards.__setitem__(k, forwards[k] + 1))
    fast = FastPath(stage, is_rank0=strategy.is_rank0)
    fast.prepare_model(model)
    strategy.setup(model)
    fast.compile(strategy.engine)
    ids = torch.randint(0, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(strategy.rank))
    loss, _ = strategy.train_micro_step(RANK_OBJECTIVES["pretrain"].loss, {"input_ids": ids, "labels": ids}, forward_guard=fast.first_forward)
    # every rank asks for every parameter: collective under ZeRO-3
    grads = {name: safe_get_full_grad(p).detach().float().clone() for name, p in sorted(strategy.module.named_parameters()) if p.requires_grad}
    result = strategy.all_reduce_sum([loss])[0] / strategy.world_size, grads, fast.record().model_dump(), forwards
    strategy.close()
    del model
    release_memory()
    torch._dynamo.reset()
    return result


def main() -> None:
    from harness.jobs.param_table import table_of
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from harness.worker.model import architecture

    plan_model = parse_plan(make_plan("ckpt", [pretrain_phase("p")], port=30500), REPO).model
    with torch.device("meta"), no_init_weights():
        table = table_of(AutoModelForCausalLM.from_config(architecture(plan_model, byte_tokenizer())))
    folder = Path(tempfile.mkdtemp(prefix="ckpt-model-"))  # each rank its own copy of the same seeded weights
    build_model(plan_model, byte_tokenizer(), 1234, None).save_pretrained(folder)
    runs = {name: one_step(dict(settings), table, folder) for name, (settings, _) in CASES.items()}
    shutil.rmtree(folder)
    report = {}
    for name, (_, reference) in CASES.items():
        loss, grads, ran, forwards = runs[name]
        ref_grads = runs[reference][1]
        report[name] = {"loss": loss, "reference": reference, "reference_loss": runs[reference][0], "ran": ran, "params": sorted(grads),
                        "mlp_forwards": forwards,
                        "grad_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads),
                        "grad_max": max(float(g.abs().max()) for g in grads.values())}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report), flush=True)
    torch.distributed.barrier()
    os._exit(0)  # as the worker does: no interpreter teardown of the process group


if __name__ == "__main__":
    main()
