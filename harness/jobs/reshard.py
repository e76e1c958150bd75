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
import math
import re
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


def rank_model_states(tag: Path) -> list[dict]:
    """Each rank's model states under ZeRO-3; the one file the ranks share under ZeRO-1/2."""
    files = sorted(tag.glob("zero_pp_rank_*_model_states.pt"), key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name)[1]))
    files = files or sorted(tag.glob("mp_rank_*_model_states.pt"))[:1]
    # Memory-mapped: only the shapes and the frozen fragments are read, not a ZeRO-1/2 file's module.
    return [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files]


def frozen_weights(states: list[dict]) -> dict[str, torch.Tensor]:
    """The tag's frozen parameters (an adapter stage's base), which ds_to_universal leaves out: from
    every rank's model states, each holding its fragment (ZeRO-3) or the whole tensor (ZeRO-1/2).
    The frozen base is held once, whole, as DeepSpeed's zero_to_fp32 holds it."""
    weights = {}
    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
        numel, fragments = math.prod(shape), [state["frozen_param_fragments"][name] for state in states]
        whole = fragments[0] if fragments[0].numel() == numel else torch.cat([f.flatten() for f in fragments])
        weights[name] = whole.flatten()[:numel].view(tuple(shape)).float()
    return weights


def consolidate(tag: Path, out: Path, model: ModelSpec, adapter: Adapter | None) -> None:
    """The tag's fp32 weights as a Hugging Face folder; a tag of an adapter stage as its merged
    model (the stage then resumes with a fresh adapter on it, as a changed adapter starts)."""
    if any(tag.glob("*optim_states.pt")):
        universal = out / "universal"
        to_universal(tag, universal)
        files = {p.name: p / "fp32.pt" for p in (universal / "zero").iterdir() if p.is_dir()}
        states = rank_model_states(tag)
        # The saved shapes, trained and frozen: ZeRO-3's universal tensors are flat.
        shapes = {name: tuple(shape) for group in states[0]["param_shapes"] for name, shape in group.items()}
        shapes.update({name: tuple(shape) for name, shape in (states[0].get("frozen_param_shapes") or {}).items()})
        frozen = {name: weight for name, weight in frozen_weights(states).items() if name not in files}
        del states
        saved = shapes  # the adapter's merge below rebinds `shapes`; the generator reads these
        weights = ((name, _universal_tensor(files[name]).view(saved[name]) if name in files else frozen[name]) for name in sorted(saved))
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
