"""Pretraining, launch side: text documents, each followed by end-of-sequence, packed end to end
into blocks of seq_len tokens; every token has loss (next-token prediction). Its rank side:
harness/worker/objectives/pretrain.py."""
from __future__ import annotations

from harness.objectives.base import Objective, RowEncoder, text_encoder
from harness.plan import DataSpec


class Pretrain(Objective):
    kind = "pretrain"
    label = "pretrain"
    samples_are_rows = False
    loss_mask = False
    metric_prefix = "lm"

    def required_columns(self, spec: DataSpec) -> list[str]:
        return [spec.text_field]

    def key_fields(self, spec: DataSpec) -> list:
        return [spec.text_field]

    def encoder(self, spec: DataSpec, tokenizer) -> RowEncoder:
        encode, eos = text_encoder(tokenizer), tokenizer.eos_token_id
        return lambda batch, first_row: [(ids + [eos], None) for ids in encode(batch[spec.text_field])]


PRETRAIN = Pretrain()
