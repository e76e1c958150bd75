"""Preference optimization, rank side: a micro batch of pairs goes through one forward as 2 x micro
padded rows (every chosen row, then every rejected row), and each row's log-probability is the sum
(dpo) or the per-token mean (ipo, simpo, orpo) of its response's trained tokens. The losses, as
TRL's DPOTrainer and CPOTrainer and LLaMA-Factory compute them (x: the log-ratio margin, pi the
policy's and ref the reference's log-probabilities):

    dpo    -(1 - e) log sigmoid(beta x) - e log sigmoid(-beta x),  x = (pi_c - ref_c) - (pi_r - ref_r)
    ipo    (x - 1 / (2 beta))^2                                      on per-token means
    simpo  -log sigmoid(beta (pi_c - pi_r) - gamma)
    orpo   -pi_c - lambda log sigmoid((pi_c - pi_r) - (log(1 - e^pi_c) - log(1 - e^pi_r)))

rewards are beta (pi - ref) for dpo and ipo, beta pi for simpo and orpo; a pair is accurate when
its chosen reward is above its rejected one (a tie is not: at the first step of dpo every reward
is 0). Step metrics train/<name>, eval metrics eval/<name> (objectives/preference.REWARD_METRICS).

The reference (dpo, ipo) is the stage's own start weights: before the first step, the stage's
ranks run one forward per pair, each rank a share, and rank 0 saves the result beside the token
store, keyed by the start weights' digest, seq_len and precision; a resumed or rerun stage, and
any stage with the same data and start, reads it instead. No second model is ever built. An
adapter stage computes it with its adapters bypassed (DeepSpeedStrategy.adapters_disabled): the
frozen base is its start weights, so it can even after a resume.
Its launch side: harness/objectives/preference.py.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.objectives.chat import give_chat_template
from harness.objectives.preference import PREFERENCE, REWARD_METRICS
from harness.plan import DataSpec, PreferenceSpec, TrainSettings
from harness.records import ReferenceRecord
from harness.records.token_store import reference_file
from harness.stages import Stage
from harness.worker.data import IGNORE_INDEX, TokenizedSet, TokenStore, eval_batches
from harness.worker.objectives.base import RankObjective
from harness.worker.objectives.finetune import FinetuneSamples, task_scores
from harness.worker.strategy import DeepSpeedStrategy


class PreferenceSamples:
    """Pairs: store rows 2i (chosen) and 2i + 1 (rejected), padded to seq_len, as arrays of shape
    (pairs, 2, seq_len); `reference_logps` (pairs, 2) once the reference is known, and each pair's
    number (`pair_index`)."""

    def __init__(self, store: TokenStore, seq_len: int, pad_id: int):
        self.store, self.rows = store, FinetuneSamples(store, seq_len, pad_id)
        self.count = store.meta.rows // 2
        self.reference: np.ndarray | None = None
        """Summed reference log-probabilities [count, 2] (dpo, ipo), set by PreferenceRank.begin."""

    def arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        rows = self.rows.padded(np.stack([2 * indices, 2 * indices + 1], axis=1).reshape(-1))
        arrays = {key: value.reshape(len(indices), 2, -1) for key, value in rows.items()}
        arrays["pair_index"] = indices
        if self.reference is not None:
            arrays["reference_logps"] = self.reference[indices]
        return arrays

    def eval_arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.arrays(indices)

    def pair(self, r: int) -> tuple[list[int], list[int]]:
        """(prompt ids, chosen response ids) of pair r, for generation."""
        return self.rows.pair(2 * r)


def pair_logps(logits_of, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities, trained tokens), each (2, pairs): row 0 the chosen responses, row 1
    the rejected ones, from one forward of all 2 x pairs rows. logits_of(input_ids, attention_mask)."""
    ids, labels, mask = (batch[key].transpose(0, 1).reshape(-1, batch[key].shape[-1]) for key in ("input_ids", "labels", "attention_mask"))
    logits = logits_of(ids, mask)[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    token = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    trained = labels != IGNORE_INDEX
    sums = (token.view(labels.shape) * trained).sum(-1)
    return sums.view(2, -1), trained.sum(-1).view(2, -1)


def preference_losses(spec: PreferenceSpec, sums: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per pair: the loss of spec.loss (see the module's formulas) and the metrics REWARD_METRICS
    (detached). sums, lengths: (2, pairs) from pair_logps; reference: (pairs, 2) summed reference
    log-probabilities (dpo, ipo)."""
    averaged = spec.loss != "dpo"
    chosen, rejected = sums / lengths if averaged else sums
    beta = spec.beta
    if spec.uses_reference:
        ref_chosen, ref_rejected = reference.T.to(sums.dtype) / lengths if averaged else reference.T.to(sums.dtype)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        x = chosen_ratio - rejected_ratio
        if spec.loss == "dpo":
            e = spec.knob("label_smoothing")
            losses = -(1 - e) * F.logsigmoid(beta * x) - e * F.logsigmoid(-beta * x)
        else:
            losses = (x - 1 / (2 * beta)) ** 2
        rewards = (beta * chosen_ratio, beta * rejected_ratio)
    elif spec.loss == "simpo":
        losses = -F.logsigmoid(beta * (chosen - rejected) - spec.knob("gamma"))
        rewards = (beta * chosen, beta * rejected)
    else:  # orpo; log(1 - e^p) as log(-expm1(p)): exact where p is near 0
        log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        losses = -chosen - spec.knob("orpo_lambda") * F.logsigmoid(log_odds)
        rewards = (beta * chosen, beta * rejected)
    reward_chosen, reward_rejected = (r.detach() for r in rewards)
    values = (reward_chosen, reward_rejected, (reward_chosen > reward_rejected).to(sums.dtype), reward_chosen - reward_rejected,
              chosen.detach(), rejected.detach())
    return losses, dict(zip(REWARD_METRICS, values))


class PreferenceRank(RankObjective):
    objective = PREFERENCE

    def samples(self, store: TokenStore, spec: DataSpec, seq_len: int, pad_id: int) -> PreferenceSamples:
        return PreferenceSamples(store, seq_len, pad_id)

    def prepare(self, model: torch.nn.Module, tokenizer, stage: Stage, spec: DataSpec) -> None:
        """The chat template message pairs were rendered with, saved with the handoff model."""
        give_chat_template(tokenizer)

    def loss(self, engine, batch: dict[str, torch.Tensor], settings: TrainSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, lengths = pair_logps(lambda ids, mask: engine(input_ids=ids, attention_mask=mask).logits, batch)
        losses, metrics = preference_losses(settings.preference, sums, lengths, batch.get("reference_logps"))
        return losses.mean(), {f"train/{name}": value.mean() for name, value in metrics.items()}

    def probe_batch(self, stage: Stage, micro: int, vocab: int) -> dict[str, torch.Tensor]:
        """micro pairs of two full-length rows, every token trained, and a reference to compare with."""
        ids = torch.randint(0, vocab, (micro, 2, stage.settings.seq_len), generator=torch.Generator().manual_seed(stage.settings.seed))
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "reference_logps": torch.zeros(micro, 2, dtype=torch.float64)}

    def begin(self, strategy: DeepSpeedStrategy, data: TokenizedSet, stage: Stage, start_digest: str, fresh: bool, micro: int) -> dict[str, Any]:
        """dpo and ipo: the reference log-probabilities of every pair under the start weights, read
        from beside the store when a stage with these start weights computed them, else computed
        now by the stage's ranks (fresh: the engine holds the start weights) and saved there. Collective."""
        s = stage.settings
        if not s.preference.uses_reference:
            return {}
        samples: PreferenceSamples = data.samples
        path = reference_file(samples.store.folder, start_digest, s.seq_len, stage.precision)
        started = time.perf_counter()
        found = strategy.broadcast_object(_read_reference(path, samples.count) if strategy.is_rank0 else None)
        reused = found is not None
        # An adapter stage's frozen base is its start weights (a new adapter is the identity), so
        # even a resumed one computes the reference with its adapters bypassed: no second model.
        adapter = strategy.adapter is not None
        if found is None and not fresh and not adapter:
            raise RuntimeError(f"stage {stage.name}: the reference log-probabilities of its start weights ({start_digest[:12]}) are not in "
                               f"{path} any more, and a resumed stage holds its checkpoint's weights, not its start weights: put the file "
                               "back, or move the stage's checkpoints/ aside so that it starts again from the previous stage")
        if found is None:
            with strategy.adapters_disabled() if adapter else contextlib.nullcontext():
                found = reference_logps(strategy, samples, micro)
            if strategy.is_rank0:
                _write_reference(path, found)
        samples.reference = found
        data.eval["reference_logps"] = found[data.eval["pair_index"]]
        seconds = time.perf_counter() - started
        if strategy.is_rank0:
            how = "read from" if reused else f"computed from the start weights ({start_digest[:12]}) in {seconds:.1f} s ({1e3 * seconds / samples.count:.1f} ms a pair), saved to"
            print(f"[harness] stage {stage.index:02d} {stage.name}: reference log-probabilities of {samples.count:,} pairs {how} {path}", flush=True)
        return {"reference": ReferenceRecord(file=str(path), pairs=samples.count, reused=reused, seconds=round(seconds, 3))}

    def evaluate(self, strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer, settings: TrainSettings, micro: int) -> dict[str, Any]:
        """The held-out pairs' mean loss and REWARD_METRICS (eval/<name>), and the task metrics of
        greedy answers to their prompts against the chosen responses. Collective."""
        totals, pairs = np.zeros(1 + len(REWARD_METRICS)), 0.0
        strategy.module.eval()
        with torch.no_grad():
            for batch, counts in eval_batches(data, micro, settings.eval_batches, strategy.rank, strategy.world_size):
                batch = {key: value.to(strategy.device) for key, value in batch.items()}
                losses, metrics = preference_losses(settings.preference, *pair_logps(strategy.logits, batch), batch.get("reference_logps"))
                if counts:
                    totals += [losses.sum().item(), *(value.sum().item() for value in metrics.values())]
                    pairs += len(losses)
        strategy.module.train()
        loss, *values, pairs = strategy.all_reduce_sum([*totals, pairs])
        result = {"loss": loss / max(pairs, 1.0), **{f"eval/{name}": value / max(pairs, 1.0) for name, value in zip(REWARD_METRICS, values)}}
        if settings.task_metrics:
            result.update(task_scores(strategy, data, tokenizer, settings))
        return result


@torch.no_grad()
def reference_logps(strategy: DeepSpeedStrategy, samples: PreferenceSamples, micro: int) -> np.ndarray:
    """Every pair's summed log-probabilities [pairs, 2] under the engine's weights. Each rank takes a
    contiguous share and runs as many forwards as the largest share needs (ZeRO-3 forwards are
    collective), a shorter share's last ones on a filler batch; the shares are gathered on every rank."""
    shares = np.array_split(np.arange(samples.count), strategy.world_size)
    mine, batches = shares[strategy.rank], -(-len(shares[0]) // micro)
    strategy.module.eval()
    parts = []
    for b in range(batches):
        chunk = mine[b * micro: (b + 1) * micro]
        batch = samples.arrays(chunk if len(chunk) else shares[0][:micro])
        sums, _ = pair_logps(strategy.logits, {key: torch.from_numpy(value) for key, value in batch.items()})
        if len(chunk):
            parts.append(sums.T.double().cpu().numpy())
    strategy.module.train()
    gathered = strategy.all_gather_object(np.concatenate(parts) if parts else np.zeros((0, 2)))
    return np.concatenate(gathered)


def _read_reference(path, pairs: int) -> np.ndarray | None:
    """The saved reference, or None when there is none for this store's pairs."""
    if not path.is_file():
        return None
    values = np.load(path)
    return values if values.shape == (pairs, 2) else None


def _write_reference(path, values: np.ndarray) -> None:
    """Atomically: another stage reading it sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with open(partial, "wb") as f:
        np.save(f, values)
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, path)
