"""The preference losses on a fixed batch: the harness's loss and its gradient with respect to the
logits equal an independent implementation written here from the papers' (and TRL's) formulas, for
every loss type; so do the logged rewards, accuracies, margins and log-probabilities. No ranks.

The oracle differs from the harness on purpose where it can: log-probabilities from log_softmax
and gather in float64 (the harness: cross_entropy in float32), chosen and rejected rows in two
separate passes (the harness: one batch of 2 x pairs rows), log(1 - e^p) as log1p(-exp(p)) as TRL
writes it (the harness: log(-expm1(p))). TRL itself is not a test dependency: installing it (with
accelerate and datasets) costs more CI time than these thirty lines of formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.plan import PreferenceSpec
from harness.worker.data import IGNORE_INDEX
from harness.worker.objectives.preference import pair_logps, preference_losses

PAIRS, LENGTH, VOCAB = 3, 7, 11


def fixed_batch() -> dict[str, torch.Tensor]:
    """3 pairs of 7-token rows: a shared prompt, responses of different lengths, padding after them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (PAIRS, 2, LENGTH), generator=gen)
    ends = torch.tensor([[7, 5], [6, 7], [4, 6]])  # real tokens per row
    prompt = torch.tensor([2, 3, 1])  # tokens of each pair's prompt (no loss)
    position = torch.arange(LENGTH)
    attention = (position < ends[..., None]).long()
    labels = torch.where((position >= prompt[:, None, None]) & (attention > 0), ids, IGNORE_INDEX)
    reference = torch.tensor([[-9.0, -7.5], [-6.0, -8.25], [-3.5, -5.0]], dtype=torch.float64)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention, "reference_logps": reference}


def oracle(spec: PreferenceSpec, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss and mean metrics from logits (pairs, 2, length, vocab), as the formulas read."""
    def logps(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"][:, side, 1:]
        mask = labels != IGNORE_INDEX
        per_token = torch.gather(logits[:, side, :-1].double().log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
        return (per_token * mask).sum(-1), mask.sum(-1)

    (chosen, chosen_n), (rejected, rejected_n) = logps(0), logps(1)
    ref_chosen, ref_rejected = batch["reference_logps"][:, 0], batch["reference_logps"][:, 1]
    if spec.loss != "dpo":  # ipo, simpo, orpo: per-token means
        chosen, rejected, ref_chosen, ref_rejected = chosen / chosen_n, rejected / rejected_n, ref_chosen / chosen_n, ref_rejected / rejected_n
    beta = spec.beta
    margin = (chosen - rejected) - (ref_chosen - ref_rejected)
    if spec.loss == "dpo":
        smoothing = spec.label_smoothing or 0.0
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
    elif spec.loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif spec.loss == "simpo":
        losses = -F.logsigmoid(beta * ((chosen - rejected) - (spec.gamma if spec.gamma is not None else 0.5) / beta))
    else:
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        losses = -chosen + (spec.orpo_lambda if spec.orpo_lambda is not None else 0.1) * -F.logsigmoid(log_odds)
    if spec.loss in ("dpo", "ipo"):
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    else:
        reward_chosen, reward_rejected = beta * chosen, beta * rejected
    metrics = {"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
               "rewards/accuracies": (reward_chosen > reward_rejected).double(), "rewards/margins": reward_chosen - reward_rejected,
               "logps/chosen": chosen, "logps/rejected": rejected}
    return losses.mean(), {name: value.mean().detach() for name, value in metrics.items()}


@pytest.mark.parametrize("spec", [
    PreferenceSpec(loss="dpo"), PreferenceSpec(loss="dpo", beta=0.5, label_smoothing=0.2), PreferenceSpec(loss="ipo", beta=0.3),
    PreferenceSpec(loss="simpo", beta=2.0, gamma=0.8), PreferenceSpec(loss="orpo", orpo_lambda=0.25),
], ids=["dpo", "dpo-smoothed", "ipo", "simpo", "orpo"])
def test_loss_and_gradients_equal_an_independent_implementation(spec: PreferenceSpec):
    batch = fixed_batch()
    logits = torch.randn(PAIRS, 2, LENGTH, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2

    ours_logits = logits.float().clone().requires_grad_(True)
    # The harness's forward sees all chosen rows, then all rejected rows: hand it the logits in that order.
    as_forward = lambda ids, mask: ours_logits.transpose(0, 1).reshape(2 * PAIRS, LENGTH, VOCAB)  # noqa: E731
    losses, metrics = preference_losses(spec, *pair_logps(as_forward, batch), batch["reference_logps"])
    losses.mean().backward()

    their_logits = logits.clone().requires_grad_(True)
    expected, expected_metrics = oracle(spec, their_logits, batch)
    expected.backward()

    assert losses.mean().item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(ours_logits.grad.double(), their_logits.grad, rtol=1e-4, atol=1e-7), (ours_logits.grad - their_logits.grad).abs().max()
    assert their_logits.grad.abs().max() > 1e-3, "the batch has a gradient to compare"
    for name, value in expected_metrics.items():
        assert metrics[name].double().mean().item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name


def test_padding_and_prompt_tokens_get_no_gradient():
    batch = fixed_batch()
    logits = torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2), requires_grad=True)
    losses, _ = preference_losses(PreferenceSpec(loss="dpo"), *pair_logps(lambda ids, mask: logits, batch), batch["reference_logps"])
    losses.mean().backward()
    # logits at position t predict token t + 1: they get a gradient exactly where label t + 1 is trained
    trained = batch["labels"].transpose(0, 1).reshape(2 * PAIRS, LENGTH)[:, 1:] != IGNORE_INDEX
    has_gradient = logits.grad[:, :-1].abs().sum(-1) > 0
    assert torch.equal(has_gradient, trained) and logits.grad[:, -1].abs().sum() == 0
