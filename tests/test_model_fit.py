"""A model that does not fit its tokenizer, its seq_len or its data, and plan values that cannot
work, are refused by `harness plan` and `harness run` before anything is written (exit 2, the
field, its value and the way out), in-process through the real command line. Next to the refusals,
what is accepted: a smaller tokenizer, a resize asked for, a rotary model past its positions (with
one warning line), "auto" in a list where the plan has the value, a pad token that is also the
end-of-turn token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import cli, finetune_phase, make_plan, pretrain_phase, write_plan
from harness.plan import BUILTIN_CONFIGS
from harness.worker.model import byte_tokenizer

PORT = 30290  # no plan here launches


def llama_folder(folder: Path, vocab: int, weights: bool = False) -> Path:
    """A tiny Llama's Hugging Face folder with `vocab` embedding rows (its config; its weights too)."""
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **BUILTIN_CONFIGS["tiny-llama"])
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def tokenizer_folder(folder: Path, template: str | None = None, pad_is_eos: bool = False) -> Path:
    """The byte tokenizer saved as a folder, with a chat template and pad token as asked."""
    tokenizer = byte_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(path: Path, rows: int = 40) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {k}"}, {"role": "assistant", "content": f"{k}"}]}) + "\n"
                            for k in range(rows)))
    return path


# An assistant turn ends with its content: nothing after it learns to stop.
UNCLOSED_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] != 'assistant' %}{{ '\\n' }}"
                     "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def plan_of(tmp_path: Path, phases: list[dict], **top) -> Path:
    return write_plan(tmp_path, make_plan("fit", phases, port=PORT, **top))


def two_stages(tmp_path: Path, **top) -> Path:
    return plan_of(tmp_path, [pretrain_phase("pre"), finetune_phase("sft")], **top)


def tokenizer_longer_than_the_embeddings(tmp_path: Path):
    model = {"path": str(llama_folder(tmp_path / "model", vocab=200)), "tokenizer": "bytes"}
    return ["plan", two_stages(tmp_path, model=model)], [
        "model.tokenizer: 'bytes' -> a tokenizer of at most 200 tokens, the model's embedding rows", "this one has 259",
        "set model.resize_embeddings: true to add 59 rows"]


def seq_len_past_learned_positions(tmp_path: Path):
    folder = tmp_path / "gpt2"
    GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=300).save_pretrained(folder)
    return ["plan", plan_of(tmp_path, [pretrain_phase("pre", seq_len=64)], model={"path": str(folder), "tokenizer": "bytes"})], [
        "phases[0].seq_len: 64 -> at most 32, the model's max_position_embeddings: it learned one position embedding per position"]


def tokenizer_folder_without_a_tokenizer(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    return ["plan", two_stages(tmp_path, model={"builtin": "tiny-llama", "tokenizer": "empty"})], [
        "model.tokenizer: 'empty' -> 'bytes' or a tokenizer folder:", "has no tokenizer files"]


def tokenizer_folder_that_does_not_load(tmp_path: Path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    return ["plan", two_stages(tmp_path, model={"builtin": "tiny-llama", "tokenizer": "broken"})], [
        f"model.tokenizer: '{tmp_path / 'broken'}' -> a folder or hub id that loads as a tokenizer (it does not:"]


def cache_dir_that_is_a_file(tmp_path: Path):
    (tmp_path / "cache").write_text("not a folder\n")
    return ["plan", two_stages(tmp_path, cache_dir="cache")], [
        f"cache_dir: 'cache' -> a folder, or a path where one can be created ({tmp_path / 'cache'} is a file): the token stores are built there"]


def only_a_stage_the_plan_lacks(tmp_path: Path):
    return ["run", two_stages(tmp_path), "--only", "9"], ["--only: '9' -> stage numbers of this plan: 0 (pre), 1 (sft)"]


def auto_in_a_list_the_plan_has_no_value_for(tmp_path: Path):
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": ["auto", "auto"]}}}))
    return ["plan", plan_of(tmp_path, [pretrain_phase("pre", deepspeed="ds.json")])], [
        "phases[0].deepspeed.optimizer.params.betas[0]: 'auto' -> a value: \"auto\" takes what the plan generates at this key",
        "phases[0].deepspeed.optimizer.params.betas[1]: 'auto'"]


def packing_on_pretrain_data(tmp_path: Path):
    phase = pretrain_phase("pre")
    phase["data"]["packing"] = True
    return ["plan", plan_of(tmp_path, [phase])], ["phases[0].data.packing: True -> false for pretrain data: pretrain blocks are always packed"]


def turns_the_template_never_closes(tmp_path: Path):
    tokenizer = tokenizer_folder(tmp_path / "tok", template=UNCLOSED_TEMPLATE)
    phase = finetune_phase("sft", data={"files": [str(chat_rows(tmp_path / "chat.jsonl"))], "rows": "chat"})
    return ["plan", plan_of(tmp_path, [phase], model={"builtin": "tiny-llama", "tokenizer": str(tokenizer)})], [
        "phases[0].data.files[0]:", "-> every trained turn closed by an end-of-turn token that is trained", "(line 1 of the file)"]


# The assistant's turns are not rendered at all (nor a generation prompt): nothing is where the loss goes.
NO_ASSISTANT_TEMPLATE = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endif %}{% endfor %}"


def a_template_that_renders_no_trained_token(tmp_path: Path):
    tokenizer = tokenizer_folder(tmp_path / "tok", template=NO_ASSISTANT_TEMPLATE)
    phase = finetune_phase("sft", data={"files": [str(chat_rows(tmp_path / "chat.jsonl"))], "rows": "chat"})
    return ["plan", plan_of(tmp_path, [phase], model={"builtin": "tiny-llama", "tokenizer": str(tokenizer)})], [
        "phases[0].data.files[0]:", "-> rows whose rendering trains at least one token (this one trains none", "(line 1 of the file)"]


BAD_INPUT = [tokenizer_longer_than_the_embeddings, seq_len_past_learned_positions, tokenizer_folder_without_a_tokenizer,
             tokenizer_folder_that_does_not_load, cache_dir_that_is_a_file, only_a_stage_the_plan_lacks, auto_in_a_list_the_plan_has_no_value_for,
             packing_on_pretrain_data, turns_the_template_never_closes, a_template_that_renders_no_trained_token]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[case.__name__ for case in BAD_INPUT])
def test_refused_before_anything_is_written(tmp_path: Path, case):
    (command, plan, *rest), expected = case(tmp_path)
    out = tmp_path / "run"
    refused = cli(command, plan, "--out", out, *rest)
    assert refused.returncode == 2, refused
    err = refused.stderr
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err and not out.exists()


def plan_ok(plan: Path, out: Path) -> tuple[str, str]:
    planned = cli("plan", plan, "--out", out, check=True)
    return planned.stdout, planned.stderr


def test_a_smaller_tokenizer_is_fine_and_a_longer_one_is_resized_when_asked(tmp_path: Path):
    small = {"path": str(llama_folder(tmp_path / "big-vocab", vocab=300)), "tokenizer": "bytes"}
    plan_ok(two_stages(tmp_path / "small", model=small), tmp_path / "small" / "run")

    resized = {"path": str(llama_folder(tmp_path / "model", vocab=200)), "tokenizer": "bytes", "resize_embeddings": True}
    out, _ = plan_ok(two_stages(tmp_path / "resized", model=resized), tmp_path / "resized" / "run")
    assert "stage 00 pre: load init" in out and "embeddings: 200 -> 259 rows, one per token of the tokenizer" in out
    stages = [json.loads(p.read_text())["stage"] for p in sorted((tmp_path / "resized" / "run" / "phases").glob("*/stage.json"))]
    assert [stage["embedding_resize"] for stage in stages] == [{"rows_before": 200, "rows_after": 259, "init": "mean"}, None], \
        "the first stage adds the rows; the next one starts from its handoff, which has them"


def test_a_rotary_model_past_its_positions_gets_one_warning_naming_its_rope_scaling(tmp_path: Path):
    _, err = plan_ok(plan_of(tmp_path, [pretrain_phase("pre", seq_len=4096), pretrain_phase("more", seq_len=4096)]), tmp_path / "run")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err
    assert warnings[0] == ("[harness] warning: phases[0].seq_len 4096 is above the model's max_position_embeddings 2048: its rotary positions, "
                           "rope_type 'default' (no scaling); beyond 2048 they extrapolate untested (set rope scaling in the model's config, "
                           "or seq_len <= 2048)")


def test_auto_in_a_list_takes_the_plans_values(tmp_path: Path):
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "auto", "params": {"betas": ["auto", "auto"], "eps": "auto"}}}))
    phase = pretrain_phase("pre", deepspeed="ds.json", optimizer={"type": "AdamW", "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-6})
    plan_ok(plan_of(tmp_path, [phase]), tmp_path / "run")
    params = json.loads((tmp_path / "run" / "phases" / "00-pre" / "ds_config.json").read_text())["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.95] and params["eps"] == 1e-6


def test_a_pad_token_that_is_the_end_of_turn_token_still_trains_each_turns_end(tmp_path: Path):
    tokenizer = tokenizer_folder(tmp_path / "tok", pad_is_eos=True)  # the built-in template closes a turn with eos
    phase = finetune_phase("sft", data={"files": [str(chat_rows(tmp_path / "chat.jsonl"))], "rows": "chat"})
    plan_ok(plan_of(tmp_path, [phase], model={"builtin": "tiny-llama", "tokenizer": str(tokenizer)}), tmp_path / "run")


def test_every_problem_is_listed_at_once(tmp_path: Path):
    phase = pretrain_phase("pre")
    phase["data"]["packing"] = True
    (tmp_path / "cache").write_text("")
    refused = cli("plan", plan_of(tmp_path, [phase], cache_dir="cache"), "--out", tmp_path / "run")
    assert refused.returncode == 2
    err = refused.stderr
    assert "2 problem(s)" in err and "phases[0].data.packing" in err and "cache_dir" in err

