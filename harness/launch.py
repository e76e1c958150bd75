"""Stage -> the `deepspeed` launcher command and the environment its ranks get. Pure.

Facts behind the choices (DeepSpeed 0.19.8, see shared/DESIGN.md):
- --master_addr is always passed: otherwise DeepSpeed takes the first
  `hostname -I` address, not the one the plan names.
- On CPU --num_gpus is explicit: the CPU accelerator counts NUMA nodes.
- Remote nodes get only MLFLOW*/PYTHON*/MV2*/UCX* variables from the runner;
  everything else travels in the .deepspeed_env file (KEY=VAL lines, and a
  blank line crashes the runner).
"""
from __future__ import annotations

from pathlib import Path

from harness.layout import StageDir
from harness.stages import Stage

WORKER_MODULE = "harness.worker"


def launcher_command(stage: Stage, stage_dir: StageDir, master_port: int, deepspeed_bin: str, hostfile: str | None) -> list[str]:
    """The exact argv that starts one stage on all its ranks."""
    cluster = stage.cluster
    argv = [deepspeed_bin]
    if cluster.launcher == "local":
        argv += ["--num_nodes", "1", "--num_gpus", str(stage.procs_per_node)]
    else:
        if hostfile is None:
            raise ValueError(f"launcher {cluster.launcher} needs a hostfile")
        argv += ["--hostfile", hostfile, "--launcher", cluster.launcher, "--num_nodes", str(stage.nodes), "--num_gpus", str(stage.procs_per_node)]
        if cluster.launcher == "slurm":
            # DeepSpeed ssh-checks the first host even for --launcher slurm.
            argv.append("--no_ssh_check")
    if cluster.include:
        argv += ["--include", cluster.include]
    if cluster.exclude:
        argv += ["--exclude", cluster.exclude]
    argv += ["--master_addr", cluster.master_addr, "--master_port", str(master_port)]
    argv += cluster.launcher_args
    argv += ["--module", WORKER_MODULE, "--stage", str(stage_dir.stage_json)]
    return argv


def rank_environment(stage: Stage, base: dict[str, str]) -> dict[str, str]:
    """Variables every rank needs, on this node and on remote ones."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # Silence the tokenizers fork warning; data loading is in the main process.
        "TOKENIZERS_PARALLELISM": "false",
    }
    if stage.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("PATH", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "HF_HOME", "TORCH_CUDA_ARCH_LIST"):
        if base.get(key):
            env[key] = base[key]
    if "TORCH_CUDA_ARCH_LIST" in env:
        # DeepSpeed 0.19.8's op builder cannot parse arch suffixes like "9.0a".
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(a.rstrip("a") for a in env["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a)
    env.update(stage.cluster.env)
    return env


def deepspeed_env_file(env: dict[str, str]) -> str:
    """Contents of .deepspeed_env: KEY=VAL lines, no blank line (it crashes the runner)."""
    return "".join(f"{key}={value}\n" for key, value in sorted(env.items()) if value != "")


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def shell_quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def deepspeed_binary(python: str) -> str:
    """The `deepspeed` script installed beside this Python, else the one on PATH."""
    candidate = Path(python).parent / "deepspeed"
    return str(candidate) if candidate.exists() else "deepspeed"
