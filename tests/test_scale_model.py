"""The model side at scale, for real on 2 CPU ranks: a ZeRO-3 rank builds only its shard, the
handoff streams into sharded safetensors that transformers loads, in the dtype the plan asks
for, and a stage keeps only its newest checkpoints.

pre (ZeRO-3, fp32 files in several shards, a checkpoint every step, keep 2)
  -> mid (ZeRO-2, weights only, bf16 files) -> post (ZeRO-3, weights only from the bf16 files)
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xxhash
from safetensors import safe_open

from conftest import harness, make_plan, manifests, pretrain_phase, write_plan

SHARD_BYTES = 100_000  # tiny-llama's fp32 weights are about 0.6 MB: several files


def digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """The manifest's weight digest, computed independently: xxh3-128 over name, shape, fp32 bytes."""
    h = xxhash.xxh3_128()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def rank_records(stage_dir: Path) -> list[dict]:
    """Each rank's memory and parameter storage by milestone (ranks/memory-rank<N>.json)."""
    return [json.loads(p.read_text())["milestones"] for p in sorted((stage_dir / "ranks").glob("memory-rank*.json"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scale")
    plan = make_plan("scale", [
        pretrain_phase("pre", zero_stage=3, steps=4, checkpoint_every=1, keep_checkpoints=2,
                       handoff_dtype="fp32", handoff_shard_bytes=SHARD_BYTES),
        pretrain_phase("mid", zero_stage=2, steps=2, handoff_dtype="bf16", optimizer={"type": "SGD", "lr": 0.05}),
        pretrain_phase("post", zero_stage=3, steps=2),
    ], port=29750)
    out = folder / "run"
    harness("run", write_plan(folder, plan), "--out", out, check=True)
    return out


def test_a_zero3_rank_builds_only_its_shard(run: Path):
    records = rank_records(run / "phases" / "00-pre")
    assert len(records) == 2
    built = [r["model_built"]["parameters"] for r in records]
    total = built[0]["total"]
    for storage in built:
        assert storage["total"] == total
        assert storage["materialized"] == 0, "no full parameter tensor in param.data"
        assert storage["local"] < 0.6 * total, "about half of the model, not all of it"
    # Each parameter's partition is padded to a multiple of the world size: 21 parameters here.
    assert total <= sum(s["local"] for s in built) <= total + 2 * 21
    for r in records:
        assert r["before_model"]["rss_bytes"] > 0 and r["end"]["peak_rss_bytes"] >= r["model_built"]["peak_rss_bytes"]


def test_zero2_ranks_hold_one_whole_copy(run: Path):
    for r in rank_records(run / "phases" / "01-mid"):
        storage = r["model_built"]["parameters"]
        assert storage["local"] == storage["materialized"] == storage["total"]


def test_zero3_seeded_init_equals_the_plain_one(run: Path):
    from harness.worker.model import build_model, byte_tokenizer

    plain = build_model(SimpleNamespace(path=None, builtin="tiny-llama"), byte_tokenizer(), 1234, None)
    (pre, *_) = manifests(run)
    assert pre["load"]["mode"] == "init"
    assert pre["start_weights_digest"] == digest(list(plain.named_parameters()))


def test_sharded_handoff_loads_with_transformers_and_equals_the_digest(run: Path):
    from transformers import AutoModelForCausalLM

    model_dir = run / "phases" / "00-pre" / "model"
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (model_dir / "model.safetensors").exists()
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((model_dir / s).stat().st_size <= SHARD_BYTES + 4096 for s in shards), "no tensor exceeds the limit alone: data + header"

    manifest = manifests(run)[0]
    assert manifest["handoff_dtype"] == "fp32" and manifest["handoff_weights_digest"] is None
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert digest(list(model.state_dict().items())) == manifest["weights_digest"]
    assert digest(list(file_tensors(model_dir).items())) == manifest["weights_digest"]
    for rel, check in manifest["files"].items():
        assert xxhash.xxh3_128((run / "phases" / "00-pre" / rel).read_bytes()).hexdigest() == check["xxh3"]
    assert {f"model/{s}" for s in shards} | {"model/model.safetensors.index.json", "model/config.json"} <= set(manifest["files"])


def test_bf16_handoff_writes_bf16_and_the_next_stage_starts_from_it(run: Path):
    pre, mid, post = manifests(run)
    assert mid["load"]["mode"] == "weights_only" and post["load"]["mode"] == "weights_only"
    assert mid["start_weights_digest"] == pre["weights_digest"]
    saved = file_tensors(run / "phases" / "01-mid" / "model")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert mid["handoff_dtype"] == "bf16" and mid["handoff_weights_digest"] != mid["weights_digest"]
    assert digest(list(saved.items())) == mid["handoff_weights_digest"] == post["start_weights_digest"]
    config = json.loads((run / "phases" / "01-mid" / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_retention_keeps_exactly_the_newest_checkpoints(run: Path):
    checkpoints = run / "phases" / "00-pre" / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step"))
    assert tags == ["step3", "step4"]
    assert all((checkpoints / tag / "complete").exists() for tag in tags)
    assert manifests(run)[0]["checkpoint_tag"] in tags
