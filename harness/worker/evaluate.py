"""Held-out evaluation: token-mean loss (and perplexity) and, for fine-tune data, exact match
of greedy generation against the reference response on a fixed sample.

Every rank runs the same number of forward passes: under ZeRO-3 each forward
gathers parameters collectively, so an uneven split would hang.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.worker.data import IGNORE_INDEX, TokenizedSet, eval_batches
from harness.worker.strategy import DeepSpeedStrategy

EXACT_MATCH_SAMPLES = 16
MAX_NEW_TOKENS = 64


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


@torch.no_grad()
def exact_match(strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer) -> float:
    """Share of the first EXACT_MATCH_SAMPLES held-out prompts whose greedy continuation
    (up to end-of-sequence) decodes to the reference response, whitespace-stripped."""
    pairs = data.eval_pairs[:EXACT_MATCH_SAMPLES]
    new_tokens = min(MAX_NEW_TOKENS, max(len(response) for _, response in pairs) + 1)
    per_rank = -(-len(pairs) // strategy.world_size)
    mine = list(range(strategy.rank, len(pairs), strategy.world_size))
    hits = 0.0
    strategy.module.eval()
    for slot in range(per_rank):
        index = mine[slot] if slot < len(mine) else 0  # filler keeps forwards in step
        prompt, response = pairs[index]
        generated = _greedy(strategy, tokenizer.eos_token_id, prompt, new_tokens)
        if slot < len(mine) and tokenizer.decode(generated).strip() == tokenizer.decode(response).strip():
            hits += 1
    strategy.module.train()
    return strategy.all_reduce_sum([hits])[0] / len(pairs)


def _greedy(strategy: DeepSpeedStrategy, eos: int, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens after the prompt, cut at end-of-sequence. Always runs new_tokens forwards."""
    ids = torch.tensor([prompt], device=strategy.device)
    out: list[int] = []
    for _ in range(new_tokens):
        next_id = strategy.logits(ids)[0, -1].argmax().item()
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=strategy.device)], dim=1)
    return out[: out.index(eos)] if eos in out else out


def eval_metrics(strategy: DeepSpeedStrategy, sets: dict[str, TokenizedSet], primary: str, tokenizer, micro: int, max_batches: int) -> dict[str, float]:
    """eval/loss and eval/ppl on the stage's primary data set; lm_* and sft_* per set; exact match on fine-tune data."""
    metrics: dict[str, float] = {}
    for kind, data in sets.items():
        loss = held_out_loss(strategy, data, micro, max_batches)
        prefix = "lm" if kind == "pretrain" else "sft"
        metrics[f"eval/{prefix}_loss"] = loss
        metrics[f"eval/{prefix}_ppl"] = math.exp(min(loss, 50.0))
        if kind == primary:
            metrics["eval/loss"] = loss
            metrics["eval/ppl"] = metrics[f"eval/{prefix}_ppl"]
        if kind == "finetune":
            metrics["eval/exact_match"] = exact_match(strategy, data, tokenizer)
    return metrics
