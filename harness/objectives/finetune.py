"""Fine-tuning, launch side: rows of prompt and response, alpaca rows or conversations
(harness/objectives/chat.py), with loss only on the responses and the end of each (the loss mask
of the store: 1 a response's content, 2 its end of turn, 0 no loss); one row per sample, padded,
or packed end to end per micro batch. Its rank side: harness/worker/objectives/finetune.py
(task metrics of greedy generation at eval)."""
from __future__ import annotations

import hashlib
from typing import Any

from harness.objectives import chat
from harness.objectives.base import DataProblem, Objective, RowEncoder, RowProblem, text_encoder
from harness.objectives.task_metrics import metric_keys
from harness.plan import DataSpec, TrainSettings


def uses_template(spec: DataSpec) -> bool:
    """Whether rows are rendered with a chat template (alpaca and chat rows)."""
    return spec.rows in ("alpaca", "chat")


class Finetune(Objective):
    kind = "finetune"
    label = "fine-tune"
    samples_are_rows = True
    loss_mask = True
    metric_prefix = "sft"

    def required_columns(self, spec: DataSpec) -> list[str]:
        """Chat rows with messages_field unset need none: each row names its own of chat.CHAT_COLUMNS."""
        return {"prompt_response": [spec.prompt_field, spec.response_field],
                "alpaca": [spec.instruction_field, spec.output_field],
                "chat": [spec.messages_field] if spec.messages_field else []}[spec.rows]

    def structured_rows(self, spec: DataSpec) -> bool:
        return uses_template(spec)

    def row_problem(self, row: dict[str, Any], spec: DataSpec) -> RowProblem | None:
        if not uses_template(spec):
            return super().row_problem(row, spec)
        try:
            chat.conversation_of(row, spec)
        except RowProblem as problem:
            return problem
        return None

    def shape_hint(self, row: dict[str, Any]) -> str:
        if any(row.get(column) is not None for column in chat.CHAT_COLUMNS):
            return "; `rows: chat` reads these"
        if "instruction" in row and "output" in row:
            return "; `rows: alpaca` reads these"
        return ""

    def key_fields(self, spec: DataSpec) -> list:
        """The columns; for template-rendered rows also the row shape and the built-in template (a
        tokenizer's own template is among its files, in the tokenizer's identity)."""
        if not uses_template(spec):
            return [spec.prompt_field, spec.response_field]
        columns = [spec.instruction_field, spec.input_field, spec.output_field, spec.system_field, spec.history_field] \
            if spec.rows == "alpaca" else [spec.messages_field, spec.tools_field]
        return [spec.rows, columns, hashlib.sha256(chat.BUILTIN_CHAT_TEMPLATE.encode()).hexdigest()[:16]]

    def encoder(self, spec: DataSpec, tokenizer) -> RowEncoder:
        """prompt + response + end-of-sequence, the two columns tokenized apart (loss on the response);
        alpaca and chat rows through the chat template (loss on every assistant turn)."""
        if not uses_template(spec):
            encode, eos = text_encoder(tokenizer), tokenizer.eos_token_id

            def pairs(batch: dict[str, list], first_row: int) -> list[tuple[list[int], list[int]]]:
                rows = zip(encode(batch[spec.prompt_field]), encode(batch[spec.response_field]))
                return [(p + r + [eos], [0] * len(p) + [1] * len(r) + [2]) for p, r in rows]

            return pairs

        def conversations(batch: dict[str, list], first_row: int) -> list[tuple[list[int], list[int]]]:
            conversations = []
            for k, values in enumerate(zip(*batch.values())):
                try:
                    conversations.append(chat.conversation_of(dict(zip(batch, values)), spec))
                except RowProblem as problem:
                    raise DataProblem(f"row {first_row + k}: {problem.expected} (it {problem.found})") from None
            return chat.encode_conversations(conversations, tokenizer, first_row)

        return conversations

    def packs_rows(self, spec: DataSpec) -> bool:
        return spec.packing

    def eval_keys(self, settings: TrainSettings) -> list[str]:
        return metric_keys(settings.task_metrics)


FINETUNE = Finetune()
