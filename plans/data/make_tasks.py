"""Writes the data of the example task plans (plans/translate.yaml, qa.yaml, summarize.yaml)
and the demo's cipher set (plans/demo.yaml): small synthetic sets, so the plans run offline on
a CPU in minutes. Seeded: running it again writes the same files.

    python plans/data/make_tasks.py          # -> plans/data/{translate,qa,summarize,cipher}.jsonl

Every slot value is a made-up 4-letter word, so a 2-layer byte model finds each answer at a
fixed distance from where the prompt holds it and learns the tasks in a few hundred steps.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from harness.demo import FINETUNE_ROWS, cipher_row

ROWS = 1200
HERE = Path(__file__).resolve().parent


def made_up_words(rng: random.Random, count: int) -> list[str]:
    """Distinct pronounceable 4-letter words: consonant, vowel, consonant, vowel."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for letters in ("bdfgklmnprstvz", "aeiou", "bdfgklmnprstvz", "aeiou")))
    return sorted(words)


def translation_rows(rng: random.Random) -> list[dict[str, str]]:
    """Toy translation between two invented languages: a 24-word lexicon, 5-word sentences
    translated word by word, source order kept. (Corpus BLEU needs 4-grams: on sentences of
    fewer than 4 words it is 0 whatever the output.)"""
    source, target = made_up_words(rng, 24), made_up_words(random.Random(1), 24)
    rng.shuffle(target)
    lexicon = dict(zip(source, target))
    rows = []
    for _ in range(ROWS):
        words = [rng.choice(source) for _ in range(5)]
        rows.append({"prompt": f"ao: {' '.join(words)}\nbe: ", "response": " ".join(lexicon[w] for w in words)})
    return rows


def qa_rows(rng: random.Random) -> list[dict[str, str]]:
    """Extractive QA over a short passage: the answer is a span of it."""
    names, towns, jobs = made_up_words(rng, 40), made_up_words(rng, 40), ["cook", "poet", "monk", "bard", "sage", "chef"]
    questions = [("Where does {name} live?", "town"), ("What is the job of {name}?", "job"), ("Who lives in {town}?", "name")]
    rows = []
    for _ in range(ROWS):
        slots = {"name": rng.choice(names), "town": rng.choice(towns), "job": rng.choice(jobs)}
        passage = f"{slots['name']} lives in {slots['town']} and works as a {slots['job']}."
        question, answer = rng.choice(questions)
        rows.append({"prompt": f"{passage}\nQ: {question.format(**slots)}\nA: ", "response": slots[answer]})
    return rows


def summarization_rows(rng: random.Random) -> list[dict[str, str]]:
    """Summarize a generated paragraph of three sentences into one: who did what, where."""
    names, towns, things = made_up_words(rng, 40), made_up_words(rng, 40), ["bread", "boats", "songs", "tools", "lamps"]
    rows = []
    for _ in range(ROWS):
        name, town, thing = rng.choice(names), rng.choice(towns), rng.choice(things)
        paragraph = f"{name} came to {town} in spring. Each day {name} made {thing} by the river. All of {town} knew the {thing}."
        rows.append({"prompt": f"{paragraph}\nSummary: ", "response": f"{name} made {thing} in {town}."})
    return rows


def cipher_rows(rng: random.Random) -> list[dict[str, str]]:
    """The demo's fine-tune set, as `harness demo` writes it (same seed)."""
    return [cipher_row(rng) for _ in range(FINETUNE_ROWS)]


def main() -> None:
    sets = (("translate", translation_rows, 11), ("qa", qa_rows, 12), ("summarize", summarization_rows, 13), ("cipher", cipher_rows, 0))
    for name, make, seed in sets:
        rows = make(random.Random(seed))
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {HERE / name}.jsonl: {len(rows)} rows, e.g. {rows[0]}")


if __name__ == "__main__":
    main()
