"""Held-out evaluation: token-mean loss (and perplexity) and, for fine-tune data, task metrics
(harness/task_metrics.py) of greedy generations against the reference responses.

Every rank runs the same number of forward passes: under ZeRO-3 a forward may gather
parameters collectively, so an uneven split would hang.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from harness import task_metrics
from harness.plan import TrainSettings
from harness.worker.data import IGNORE_INDEX, TokenizedSet, eval_batches
from harness.worker.strategy import DeepSpeedStrategy


@torch.no_grad()
def held_out_loss(strategy: DeepSpeedStrategy, data: TokenizedSet, micro: int, max_batches: int) -> float:
    """Mean loss over every labelled token of up to max_batches held-out batches."""
    total, count = 0.0, 0.0
    strategy.module.eval()
    for batch, counts in eval_batches(data, micro, max_batches, strategy.rank, strategy.world_size):
        logits = strategy.logits(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"][:, 1:].to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        if counts:
            total += loss.item()
            count += (labels != IGNORE_INDEX).sum().item()
    strategy.module.train()
    total, count = strategy.all_reduce_sum([total, count])
    return total / max(count, 1.0)


def task_scores(strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer, settings: TrainSettings) -> dict[str, float]:
    """settings.task_metrics of greedy generations for the first task_rows held-out prompts
    against their reference responses; the same values on every rank."""
    pairs = data.eval_pairs[: settings.task_rows]
    predictions = greedy_texts(strategy, tokenizer, [prompt for prompt, _ in pairs], settings)
    references = [tokenizer.decode(response, skip_special_tokens=True).strip() for _, response in pairs]
    return task_metrics.score(settings.task_metrics, predictions, references)


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


def eval_metrics(strategy: DeepSpeedStrategy, sets: dict[str, TokenizedSet], primary: str, tokenizer, settings: TrainSettings,
                 micro_batch: int) -> dict[str, float]:
    """eval/loss and eval/ppl on the stage's primary data set (held-out rows in batches of
    micro_batch); lm_* and sft_* per set; the task metrics (eval/exact_match, eval/bleu, ...) on
    fine-tune data."""
    metrics: dict[str, float] = {}
    for kind, data in sets.items():
        loss = held_out_loss(strategy, data, micro_batch, settings.eval_batches)
        prefix = "lm" if kind == "pretrain" else "sft"
        metrics[f"eval/{prefix}_loss"] = loss
        metrics[f"eval/{prefix}_ppl"] = math.exp(min(loss, 50.0))
        if kind == primary:
            metrics["eval/loss"] = loss
            metrics["eval/ppl"] = metrics[f"eval/{prefix}_ppl"]
        if kind == "finetune" and settings.task_metrics:
            metrics.update(task_scores(strategy, data, tokenizer, settings))
    return metrics
