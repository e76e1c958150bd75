"""The embedded default: a small plan and the data it trains on, made offline.

Pretraining text is the CPython documentation that ships with every Python
(`pydoc_data.topics`); the fine-tune task is generated: repeat a made-up word.
`harness demo` writes both into its output folder and runs the plan.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

PLAN = Path(__file__).with_name("plan.yaml")
FINETUNE_ROWS = 800


def write_demo_data(folder: Path, seed: int = 0) -> None:
    """data/pretrain.txt (paragraphs of the Python docs) and data/finetune.jsonl (prompt/response)."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pretrain.txt").write_text("\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n")
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(folder / "finetune.jsonl", "w") as f:
        for _ in range(FINETUNE_ROWS):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"prompt": f"Q: repeat {word}\nA: ", "response": word}) + "\n")


def write_demo_workspace(folder: Path) -> Path:
    """The demo plan and its data in folder; returns the plan's path. Existing files are kept,
    so a second `harness demo` resumes the same run."""
    plan = folder / "demo.yaml"
    if not plan.exists():
        write_demo_data(folder / "data")
        shutil.copyfile(PLAN, plan)
    return plan
