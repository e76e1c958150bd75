"""The embedded default: a small plan and the data it trains on, made offline.

Pretraining text is the CPython documentation that ships with every Python
(`pydoc_data.topics`); the fine-tune task is generated: a cipher that shifts each
letter of a 4-letter word to the next one ("Q: shift abcd" -> "bcde"). A 2-layer byte
model learns it in a couple of hundred steps (exact match from 0 to about 1), where it
did not learn to repeat words of varying length. The preference phase after it takes pairs
of the right answer (chosen) and the word shifted by another amount (rejected). `harness demo`
writes the three data sets into its output folder and runs the plan.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

PLAN = Path(__file__).with_name("plan.yaml")
FINETUNE_ROWS = 800
PREFERENCE_PAIRS = 400
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def shift(word: str, by: int) -> str:
    """Every letter moved on by `by` (z wraps to a)."""
    return "".join(LETTERS[(LETTERS.index(c) + by) % len(LETTERS)] for c in word)


def cipher_row(rng: random.Random) -> dict[str, str]:
    """One fine-tune row: a random 4-letter word and the word with every letter shifted by one
    (z wraps to a). The fixed length keeps each answer letter at a fixed distance from its source."""
    word = "".join(rng.choice(LETTERS) for _ in range(4))
    return {"prompt": f"Q: shift {word}\nA: ", "response": shift(word, 1)}


def cipher_pair(rng: random.Random) -> dict[str, str]:
    """One preference pair: a cipher prompt, the right answer (chosen) and the word shifted by
    another amount, 2 to 25 (rejected)."""
    row = cipher_row(rng)
    word = row["prompt"].removeprefix("Q: shift ")[:4]
    return {"prompt": row["prompt"], "chosen": row["response"], "rejected": shift(word, rng.randint(2, 25))}


def write_demo_data(folder: Path, seed: int = 0) -> None:
    """data/pretrain.txt (paragraphs of the Python docs), data/cipher.jsonl (prompt/response) and
    data/cipher_pairs.jsonl (prompt/chosen/rejected)."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pretrain.txt").write_text("\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n")
    rng = random.Random(seed)
    with open(folder / "cipher.jsonl", "w") as f:
        for _ in range(FINETUNE_ROWS):
            f.write(json.dumps(cipher_row(rng)) + "\n")
    with open(folder / "cipher_pairs.jsonl", "w") as f:
        for _ in range(PREFERENCE_PAIRS):
            f.write(json.dumps(cipher_pair(rng)) + "\n")


def write_demo_workspace(folder: Path) -> Path:
    """The demo plan and its data in folder; returns the plan's path. Existing files are kept,
    so a second `harness demo` resumes the same run."""
    plan = folder / "demo.yaml"
    if not plan.exists():
        write_demo_data(folder / "data")
        shutil.copyfile(PLAN, plan)
    return plan
