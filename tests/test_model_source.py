"""Where the model and its tokenizer come from: a local folder, or a hub model id resolved at plan
load through the Hugging Face cache (the worker only ever sees local folders); the tokenizer is
the model's own unless the plan says otherwise, bytes for a builtin model."""
from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import harness, make_plan, pretrain_phase, write_plan

REVISION = "0123456789abcdef0123456789abcdef01234567"
# A tokenizer and a model config that load (`harness plan` loads the tokenizer and builds the model on the meta device).
TOKENIZER = json.dumps({"version": "1.0", "added_tokens": [], "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}})
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": 300})


def hub_cache_entry(hub_cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A genuine Hugging Face cache entry, as `hf download` leaves it: blobs, a snapshot folder of
    links to them, and refs/main naming the snapshot's revision."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_text(text)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def offline_env(hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def plan_with_model(tmp_path: Path, model: dict) -> Path:
    return write_plan(tmp_path, make_plan("source", [pretrain_phase("pre", steps=2)], port=29700, procs=1, model=model))


def resolved_model(out: Path) -> dict:
    return json.loads((out / "phases" / "00-pre" / "stage.json").read_text())["stage"]["model"]


def test_a_cached_hub_id_resolves_to_its_snapshot_folder_with_its_tokenizer(tmp_path: Path):
    hf_home = tmp_path / "hf"
    snapshot = hub_cache_entry(hf_home / "hub", "tiny-org/tiny-model", {"config.json": CONFIG, "tokenizer.json": TOKENIZER})
    plan = plan_with_model(tmp_path, {"path": "tiny-org/tiny-model"})

    harness("plan", plan, "--out", tmp_path / "run", check=True, env=offline_env(hf_home))

    assert resolved_model(tmp_path / "run") == {"builtin": None, "path": str(snapshot), "tokenizer": str(snapshot), "resize_embeddings": False}


def test_an_uncached_hub_id_offline_exits_2_naming_it_and_writes_nothing(tmp_path: Path):
    plan = plan_with_model(tmp_path, {"path": "tiny-org/not-downloaded"})

    result = harness("plan", plan, "--out", tmp_path / "run", env=offline_env(tmp_path / "hf"))

    assert result.returncode == 2
    assert "model.path: 'tiny-org/not-downloaded'" in result.stderr
    assert "not in the Hugging Face cache" in result.stderr and "hf download tiny-org/not-downloaded" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_tokenizer_files_needs_an_explicit_tokenizer(tmp_path: Path):
    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "config.json").write_text(CONFIG)

    refused = harness("plan", plan_with_model(tmp_path, {"path": str(model)}), "--out", tmp_path / "run")
    assert refused.returncode == 2
    assert "model.tokenizer: None -> unset, so the model's own tokenizer" in refused.stderr and "`tokenizer: bytes`" in refused.stderr
    assert not (tmp_path / "run").exists()

    harness("plan", plan_with_model(tmp_path, {"path": str(model), "tokenizer": "bytes"}), "--out", tmp_path / "run", check=True)
    assert resolved_model(tmp_path / "run")["tokenizer"] == "bytes"


def test_the_tokenizer_defaults_to_the_model_folder_and_bytes_for_a_builtin(tmp_path: Path):
    model = tmp_path / "models" / "mine"
    model.mkdir(parents=True)
    (model / "config.json").write_text(CONFIG)
    (model / "tokenizer.json").write_text(TOKENIZER)

    harness("plan", plan_with_model(tmp_path, {"path": "models/mine"}), "--out", tmp_path / "local", check=True)
    assert resolved_model(tmp_path / "local") == {"builtin": None, "path": str(model), "tokenizer": str(model), "resize_embeddings": False}

    harness("plan", plan_with_model(tmp_path, {"builtin": "tiny-llama"}), "--out", tmp_path / "builtin", check=True)
    assert resolved_model(tmp_path / "builtin")["tokenizer"] == "bytes"
