"""`python -m harness.jobs.reshard '<json>'`: turn one DeepSpeed checkpoint tag into the folder that
a resume with another topology loads (see harness/stages/resume.py). A child process of the launch
side, because it needs torch; writes `<out>.partial` and renames it when complete.

- universal:    DeepSpeed's ds_to_universal: per-parameter fp32 weights and optimizer moments,
                loadable at any world size with `checkpoint.load_universal`.
- consolidated: the tag's fp32 weights as a Hugging Face folder (config.json + safetensors; an
                adapter stage's merged), written one tensor at a time: from the universal form for ZeRO-1..3 (and
                bf16 ZeRO-0), from the replicated module state for fp32 ZeRO-0.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from harness.records import CHECKPOINT_COMPLETE, Adapter
from harness.plan import ModelSpec
from harness.worker.adapter import merged_shapes, merged_weights
from harness.worker.model import SafetensorsWriter, architecture, load_tokenizer

SHARD_BYTES = 5_000_000_000


def to_universal(tag: Path, out: Path) -> None:
    # --inject_missing_state: the universal info Megatron adds to its checkpoints; plain
    # data parallelism needs none of its patterns.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag), "--output_folder", str(out),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _universal_tensor(path: Path, mmap: bool = False) -> torch.Tensor:
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    return saved["param"] if isinstance(saved, dict) else saved


def consolidate(tag: Path, out: Path, model: ModelSpec, adapter: Adapter | None) -> None:
    """The tag's fp32 weights as a Hugging Face folder; a tag of an adapter stage as its merged
    model (the stage then resumes with a fresh adapter on it, as a changed adapter starts)."""
    if any(tag.glob("*optim_states.pt")):
        universal = out / "universal"
        to_universal(tag, universal)
        files = {p.name: p / "fp32.pt" for p in (universal / "zero").iterdir() if p.is_dir()}
        # Shapes first (memory-mapped: no data read), then one tensor at a time.
        shapes = {name: tuple(_universal_tensor(path, mmap=True).shape) for name, path in files.items()}
        weights = ((name, _universal_tensor(files[name])) for name in sorted(files))
    else:  # fp32 ZeRO-0: every rank saved the whole module, so it fits like one rank's copy
        module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        shapes = {name: tuple(w.shape) for name, w in module.items()}
        weights = ((name, module[name]) for name in sorted(module))
    if adapter is not None:
        shapes, weights = merged_shapes(shapes, adapter), merged_weights(weights, adapter)
    writer = SafetensorsWriter(out, shapes, torch.float32, SHARD_BYTES)
    for name, weight in weights:
        writer.add(name, weight.float())
    writer.close()
    config = architecture(model, load_tokenizer(model.tokenizer))
    config.dtype = torch.float32
    config.save_pretrained(out)
    shutil.rmtree(out / "universal", ignore_errors=True)


def main(request: dict) -> None:
    tag, out = Path(request["checkpoint"]), Path(request["out"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if request["mode"] == "universal":
        to_universal(tag, partial)
    else:
        adapter = Adapter.model_validate(request["adapter"]) if request.get("adapter") else None
        consolidate(tag, partial, ModelSpec.model_validate(request["model"]), adapter)
    (partial / CHECKPOINT_COMPLETE).write_text(json.dumps({"from": str(tag)}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
