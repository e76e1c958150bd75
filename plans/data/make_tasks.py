"""Writes the data of the example task plans (plans/translate.yaml, qa.yaml, summarize.yaml),
the demo's cipher set and cipher pairs (plans/demo.yaml, plans/preference.yaml), and small
examples of the preference and tool-calling row shapes: small synthetic sets, so the plans run
offline on a CPU in minutes. Seeded: running it again writes the same files.

    python plans/data/make_tasks.py   # -> plans/data/{translate,qa,summarize,cipher,cipher_pairs,pairs_*,tools_*}.jsonl

Every slot value is a made-up 4-letter word, so a 2-layer byte model finds each answer at a
fixed distance from where the prompt holds it and learns the tasks in a few hundred steps.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from harness.demo import FINETUNE_ROWS, PREFERENCE_PAIRS, cipher_pair, cipher_row

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


def cipher_pairs(rng: random.Random) -> list[dict[str, str]]:
    """The demo's preference set, as `harness demo` writes it (same seed: drawn after its fine-tune rows)."""
    cipher_rows(rng)
    return [cipher_pair(rng) for _ in range(PREFERENCE_PAIRS)]


def chat_pairs(rng: random.Random) -> list[dict]:
    """Cipher pairs as UltraFeedback holds pairs: chosen and rejected conversations that share the
    user turn (and a prompt column repeating it, which is not read)."""
    rows = []
    for pair in cipher_pairs(rng)[:64]:
        user = {"role": "user", "content": pair["prompt"].strip()}
        rows.append({"prompt": user["content"], "chosen": [user, {"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": pair["rejected"]}]})
    return rows


def sharegpt_pairs(rng: random.Random) -> list[dict]:
    """Cipher pairs as LLaMA-Factory's dpo_en_demo.json holds pairs: the conversation, then chosen
    and rejected as one {from, value} message each."""
    return [{"conversations": [{"from": "system", "value": "You answer with the shifted word."}, {"from": "human", "value": pair["prompt"].strip()}],
             "chosen": {"from": "gpt", "value": pair["chosen"]}, "rejected": {"from": "gpt", "value": pair["rejected"]}}
            for pair in cipher_pairs(rng)[:64]]


SHIFT_TOOL = {"name": "shift", "description": "Shift every letter of a word", "parameters": {
    "type": "object", "properties": {"word": {"type": "string"}, "by": {"type": "integer"}}, "required": ["word", "by"]}}


def sharegpt_tool_rows(rng: random.Random) -> list[dict]:
    """Tool calling as glaive and LLaMA-Factory hold it: sharegpt turns with function_call (the call
    as JSON text) and observation (the tool's result), the tools as JSON text: the model calls a
    shift tool, then answers with its result."""
    rows = []
    for pair in cipher_pairs(rng)[:64]:
        word, answer = pair["prompt"].removeprefix("Q: shift ")[:4], pair["chosen"]
        rows.append({"conversations": [{"from": "human", "value": f"Shift {word} by one."},
                                       {"from": "function_call", "value": json.dumps({"name": "shift", "arguments": {"word": word, "by": 1}})},
                                       {"from": "observation", "value": json.dumps({"result": answer})},
                                       {"from": "gpt", "value": f"It is {answer}."}], "tools": json.dumps([SHIFT_TOOL])})
    return rows


def openai_tool_rows(rng: random.Random) -> list[dict]:
    """The same as OpenAI's chat format holds it: an assistant message with tool_calls (arguments as
    JSON text), a tool message, content as lists of text parts, the tools as schemas."""
    rows = []
    for k, pair in enumerate(cipher_pairs(rng)[:64]):
        word, answer = pair["prompt"].removeprefix("Q: shift ")[:4], pair["chosen"]
        rows.append({"messages": [{"role": "user", "content": [{"type": "text", "text": f"Shift {word} by one."}]},
                                  {"role": "assistant", "content": None, "tool_calls": [
                                      {"id": f"call{k}", "type": "function", "function": {"name": "shift", "arguments": json.dumps({"word": word, "by": 1})}}]},
                                  {"role": "tool", "tool_call_id": f"call{k}", "content": [{"type": "text", "text": json.dumps({"result": answer})}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": f"It is {answer}."}]}],
                     "tools": [{"type": "function", "function": SHIFT_TOOL}]})
    return rows


def main() -> None:
    sets = (("translate", translation_rows, 11), ("qa", qa_rows, 12), ("summarize", summarization_rows, 13), ("cipher", cipher_rows, 0),
            ("cipher_pairs", cipher_pairs, 0), ("pairs_chat", chat_pairs, 0), ("pairs_sharegpt", sharegpt_pairs, 0), ("tools_sharegpt", sharegpt_tool_rows, 0),
            ("tools_openai", openai_tool_rows, 0))
    for name, make, seed in sets:
        rows = make(random.Random(seed))
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {HERE / name}.jsonl: {len(rows)} rows, e.g. {rows[0]}")


if __name__ == "__main__":
    main()
