"""What both benchmarks share: plan writing, running the harness, starting a script with the
very launcher command and rank environment the harness used for a stage, timing files as
they appear and grow, the 370M model folder, tables and result files.

The benchmark processes themselves never import torch or DeepSpeed (only the scripts they
launch do), so they add no load to the machine while something is measured.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OUT = BENCH / "out"
PRETRAIN_TEXT = REPO / "plans" / "data" / "pretrain.txt"
FINETUNE_JSONL = REPO / "plans" / "data" / "finetune.jsonl"

# Workers find the harness without an install (the GPU machine has no pip install of it),
# and on CPU the JIT-built shm op is cached across runs.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/harness-test-torch-ext")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(REPO))

from harness.records import RunDir, StageDir  # noqa: E402  (paths only: the bench reads what the harness wrote)
from harness.launch.command import deepspeed_binary, launcher_command  # noqa: E402
from harness.launch.hosts import hostfile_path  # noqa: E402
from harness.launch.processes import free_port  # noqa: E402
from harness.stages import StageFile  # noqa: E402

# ~370M-parameter Llama shape for GPU runs (random init, written once under bench/out).
LLAMA_370M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816, vocab_size=32000)
# The same shape with the byte vocabulary: 308,861,952 parameters (CPU memory benchmarks).
LLAMA_309M = dict(LLAMA_370M, vocab_size=259, tie_word_embeddings=False)
# ~61M parameters, half of them the 32000-token embedding and head: the logits weigh in.
LLAMA_61M = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1664, vocab_size=32000, tie_word_embeddings=False)


# ---- model and plan ---------------------------------------------------------------------
def model_block(name: str) -> dict[str, str]:
    """The plan's `model:` for a --model choice: a built-in config, or the 370M HF folder."""
    if name in ("tiny-llama", "small-llama"):
        return {"builtin": name, "tokenizer": "bytes"}
    if name == "llama-370m":
        return {"path": str(llama_370m_folder()), "tokenizer": "bytes"}  # byte ids (< 259) fit the 32000 vocab
    raise SystemExit(f"unknown --model {name}")


def llama_370m_folder() -> Path:
    return random_llama_folder("llama-370m", LLAMA_370M)


def random_llama_folder(name: str, shape: dict[str, Any]) -> Path:
    """bench/out/<name>: a random-init Llama Hugging Face folder of this shape; written by a
    child Python (torch stays out of this process) the first time only."""
    folder = OUT / name
    if not (folder / "config.json").exists():
        code = (
            "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            f"torch.manual_seed(0); m = LlamaForCausalLM(LlamaConfig(**{shape!r}, max_position_embeddings=2048)); "
            "m.save_pretrained(sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder


def fast_setting(text: str) -> str | dict[str, Any]:
    """--fast as the plan takes it: auto, off, or parts separated by commas (compile,liger,flash)."""
    if text in ("auto", "off"):
        return text
    parts: dict[str, Any] = {}
    for part in text.split(","):
        if part in ("sdpa", "flash", "eager"):
            parts["attention"] = part
        else:
            parts[part] = True
    return parts


def write_plan(folder: Path, name: str, args, phases: list[dict[str, Any]], port: int, transitions: str = "swap") -> Path:
    """A plan with one or more phases (pretrain unless a phase says otherwise) on the bench's model,
    data and ranks. Eval and checkpoints happen only at each phase's end (eval: one batch)."""
    plan = {
        "name": name,
        "model": model_block(args.model),
        "cluster": {"launcher": "local", "accelerator": args.accelerator, "procs_per_node": args.ranks, "master_port": port,
                    "transitions": transitions},
        "wandb": {"mode": "disabled"},
        "defaults": {
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "zero_stage": args.zero, "fast": fast_setting(getattr(args, "fast", "auto")),
            "eval_every": 1_000_000, "checkpoint_every": 1_000_000, "eval_batches": 1, "log_every": 1,
            "optimizer": {"type": "AdamW", "lr": 1e-4}, "scheduler": {"type": "WarmupLR", "warmup_ratio": 0.1},
        },
        "phases": [{"kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, **p} for p in phases],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_harness(plan: Path, out: Path) -> RunDir:
    """`python -m harness.cli run`: the real orchestrator and worker. Output goes to a log file."""
    with open(out.parent / f"{out.name}.log", "wb") as log:
        code = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"harness run failed ({code}); see {out.parent / f'{out.name}.log'} and {out}/phases/*/launcher.log")
    return RunDir(out)


# ---- launching a script like a stage -------------------------------------------------------
def launch_like_stage(stage_dir: StageDir, script: Path, script_args: list[str], log: Path, port_from: int) -> tuple[float, float]:
    """Run `script` under the `deepspeed` launcher argv (launcher_command) and rank environment
    (.deepspeed_env) that the harness used for `stage_dir`; only the master port and the program
    differ. Returns the wall times (start, end) of the launcher process."""
    stage = StageFile.read(stage_dir.stage_json).stage
    port = free_port(port_from)  # a reused port stalls init (DESIGN.md)
    argv = launcher_command(stage, [], stage.cluster.master_addr, port, deepspeed_binary(sys.executable), hostfile_path(stage, stage_dir),
                            program=[str(script), *script_args])
    env_file = stage_dir.deepspeed_env
    rank_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line)
    env = {**os.environ, **rank_env, "DS_ENV_FILE": str(env_file)}
    with open(log, "wb") as out:
        start = time.time()
        code = subprocess.run(argv, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True).returncode
        end = time.time()
    if code != 0:
        raise SystemExit(f"{script.name} failed ({code}); see {log}")
    return start, end


# ---- timing files as they appear and grow -------------------------------------------------
class Poller:
    """A background thread that calls `poll()` every interval_s while the `with` block runs."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(self.interval_s)

    def poll(self) -> None:
        raise NotImplementedError


class FileClock(Poller):
    """Wall time at which some files appeared (`appeared`) and each of their lines did
    (`stamps`). Metrics rows carry no time of their own, and file mtimes can be too coarse
    (whole seconds on the GPU machine's disk), so a thread polls the files every few
    milliseconds (a stat call: no measurable load) and stamps what is new."""

    def __init__(self, paths: list[Path], interval_s: float = 0.005):
        super().__init__(interval_s)
        self.paths = paths
        self.appeared: dict[Path, float] = {}
        self.stamps: dict[Path, list[float]] = {p: [] for p in paths}
        self._read: dict[Path, int] = {p: 0 for p in paths}

    def poll(self) -> None:
        for path in self.paths:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            self.appeared.setdefault(path, time.time())
            if size > self._read[path]:
                now = time.time()
                with open(path, "rb") as f:
                    f.seek(self._read[path])
                    chunk = f.read(size - self._read[path])
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written line waits for the next poll
                self._read[path] += len(complete)
                self.stamps[path] += [now] * complete.count(b"\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(rows: list[dict[str, Any]], stamps: list[float], warmup: int, tokens_per_step: int) -> dict[str, float]:
    """tokens/s over the steps after `warmup` (>= 1), two ways:
    step: tokens / the sum of each row's own step time (what metrics.jsonl reports);
    wall: tokens / time between row arrivals, so work between steps counts too. The last row
    is left out of `wall`: it is written after the final eval."""
    timed = rows[warmup:]
    step_time = sum(tokens_per_step / r["train/tokens_per_s"] for r in timed)
    wall_time = stamps[len(rows) - 2] - stamps[warmup - 1]  # rows warmup .. len-2
    return {
        "step_tokens_per_s": tokens_per_step * len(timed) / step_time,
        "wall_tokens_per_s": tokens_per_step * (len(rows) - 1 - warmup) / wall_time,
        "steps_timed": len(timed),
    }


# ---- reporting ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What ran it: CPU, cores, GPU (nvidia-smi), Python; torch and DeepSpeed versions from pip metadata."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu or None, "python": platform.python_version(),
            "torch": version("torch"), "deepspeed": version("deepspeed"), "transformers": version("transformers")}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table (numbers formatted by the caller)."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_results(name: str, results: dict[str, Any]) -> Path:
    """bench/out/<name>-<UTC time>.json, plus <name>-latest.json."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = {"date_utc": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **results}
    OUT.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    path = OUT / f"{name}-{stamp}.json"
    path.write_text(text)
    (OUT / f"{name}-latest.json").write_text(text)
    return path


def work_dir(name: str) -> Path:
    """A fresh folder for one benchmark invocation's runs and logs."""
    folder = OUT / f"{name}-runs" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def add_common_args(parser) -> None:
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, default=None, help="processes (GPUs) on this node; default: 2 on cpu, 1 on cuda")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    parser.add_argument("--model", choices=["tiny-llama", "small-llama", "llama-370m"], default=None,
                        help="default: tiny-llama on cpu, llama-370m on cuda")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8 on cpu, 16 on cuda")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 on cpu, 1024 on cuda")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fast", default="auto", help="the harness side's fast setting: auto, off, or parts, e.g. compile,liger,flash")


def fill_defaults(args) -> None:
    """Defaults that depend on the accelerator: small and quick on CPU, the H100 figure's shape on GPU."""
    cpu = args.accelerator == "cpu"
    args.ranks = args.ranks or (2 if cpu else 1)
    args.model = args.model or ("tiny-llama" if cpu else "llama-370m")
    args.micro_batch = args.micro_batch or (8 if cpu else 16)
    args.seq_len = args.seq_len or (128 if cpu else 1024)
