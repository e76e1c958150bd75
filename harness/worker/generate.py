"""Greedy generation on every rank together (for task metrics at eval): each rank generates its
share of the prompts, every generation runs until every rank is done (synced_gpus), and under
ZeRO-3 the weights are gathered once for the whole generation (DeepSpeedStrategy.generation_module).
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from harness.plan import TrainSettings
from harness.worker.strategy import DeepSpeedStrategy


def greedy_texts(strategy: DeepSpeedStrategy, tokenizer, prompts: list[list[int]], settings: TrainSettings) -> list[str]:
    """The greedy continuation of each prompt, decoded and stripped, on every rank. Rank r
    generates prompts r, r + world, ... in batches of generation_batch; a rank with fewer
    prompts generates a filler batch, so every rank runs the same number of generations, and
    each generation runs until every rank is done (synced_gpus)."""
    mine = list(range(strategy.rank, len(prompts), strategy.world_size))
    size = settings.generation_batch
    batches = _ceil_div(_ceil_div(len(prompts), strategy.world_size), size)
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts: dict[int, str] = {}
    with torch.no_grad(), strategy.generation_module(settings.generation_gather) as module:
        for b in range(batches):
            chunk = mine[b * size : (b + 1) * size]
            rows = [prompts[i] for i in chunk] or [prompts[0]]  # filler: its result is dropped
            for i, ids in zip(chunk, _generate(module, rows, config, strategy.device, strategy.world_size > 1)):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    merged = {i: text for part in strategy.all_gather_object(texts) for i, text in part.items()}
    return [merged[i] for i in range(len(prompts))]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _generate(module: torch.nn.Module, rows: list[list[int]], config: GenerationConfig, device: torch.device, synced: bool) -> list[list[int]]:
    """Greedy new tokens of each row, cut before end-of-sequence. Rows are left-padded and masked
    (rotary positions are relative, so the padding changes no real token's attention)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    out = module.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, synced_gpus=synced)
    new = out[:, width:].tolist()
    return [tokens[: tokens.index(config.eos_token_id)] if config.eos_token_id in tokens else tokens for tokens in new]
