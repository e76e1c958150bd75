"""Started by tests/test_adapter_run.py under the real `deepspeed` launcher: rebuilds a finished
adapter stage's engine on its ranks (its stage.json and DeepSpeed config, the model wrapped as the
worker wraps it, its last checkpoint loaded as a full_state start loads it) and computes per-token
log-probs of a fixed batch twice: inside DeepSpeedStrategy.adapters_disabled() (what a dpo/ipo
reference pass calls) and with the adapters on. Rank 0 saves both to the file named.

    deepspeed --num_gpus 2 tests/adapter_reference.py <stage folder> <out.pt>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from harness.records import StageDir, read_manifest
from harness.stages import StageFile
from harness.worker.adapter import adapted
from harness.worker.model import build_model, build_tokenizer
from harness.worker.strategy import DeepSpeedStrategy, exit_launch

BATCH = torch.tensor([[5 + (7 * i + 3 * j) % 240 for j in range(24)] for i in range(2)])


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every position of every row."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def main(stage_dir: StageDir, out: Path) -> None:
    spec = StageFile.read(stage_dir.stage_json)
    stage = spec.stage
    strategy = DeepSpeedStrategy(stage, json.loads(stage_dir.ds_config.read_text()))
    tokenizer = build_tokenizer(stage.model, Path(spec.previous) / "model")
    model = adapted(build_model(stage.model, tokenizer, stage.settings.seed, Path(spec.previous) / "model", load_weights=False), stage)
    strategy.setup(model)
    strategy.load_checkpoint(stage_dir.checkpoints, read_manifest(stage_dir, verify_files=False).checkpoint_tag, with_scheduler=False)
    strategy.module.eval()
    with torch.no_grad():
        with strategy.adapters_disabled():
            reference = token_log_probs(strategy.logits(BATCH), BATCH)
        adapted_now = token_log_probs(strategy.logits(BATCH), BATCH)
    if strategy.is_rank0:
        torch.save({"batch": BATCH, "adapters_disabled": reference, "adapters_on": adapted_now}, out)
    strategy.close()
    exit_launch(0)


if __name__ == "__main__":
    stage_folder, out_file = sys.argv[-2:]  # after the launcher's --local_rank
    main(StageDir(Path(stage_folder)), Path(out_file))
