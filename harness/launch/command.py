"""Stage -> the `deepspeed` launcher command and the environment its ranks get (secrets kept off
what the launcher logs: harness.plan.is_secret says which variables are). Pure.

Facts behind the choices (DeepSpeed 0.19.8, see shared/DESIGN.md and slurm/NOTES-cluster.md):
- --master_addr is always passed: otherwise DeepSpeed takes the first
  `hostname -I` address, not the one the plan names.
- On CPU --num_gpus is explicit for local/pdsh (the CPU accelerator counts NUMA
  nodes) and absent for slurm (the slurm runner turns it into srun --gpus-per-node).
- The slurm runner ignores --module and runs `srun ... python -u <script>`, so it
  gets the worker's file path; srun gets --wait=60 so a crashed rank's peers do
  not hang in a collective (not --kill-on-bad-exit: it would kill peers that are
  still checkpointing after a preemption).
- Remote nodes get only MLFLOW*/PYTHON*/MV2*/UCX* variables from the runner;
  everything else travels in the .deepspeed_env file (KEY=VAL lines, and a
  blank line crashes the runner).
- The multi-node runners copy those variables and every .deepspeed_env line onto the
  command line they log (pdsh: `export KEY=VAL;`, slurm: `--export=ALL,KEY=VAL`), so
  secrets stay out of both: pdsh ranks read them from a private file (HARNESS_SECRETS_FILE),
  the other ranks inherit them from the launcher's environment.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from harness.plan import is_secret
from harness.records import StageDir
from harness.records.environment import FAULT_VAR, STOP_FILE_VAR
from harness.stages import Stage

WORKER_MODULE = "harness.worker"
WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "worker" / "__main__.py"
SRUN_ARGS = "--wait=60"
# Variables of the launching shell that the ranks need on every node.
PASSED_THROUGH = (
    "PATH", "PYTHONPATH", "VIRTUAL_ENV", "HF_HOME", "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST",
    "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", STOP_FILE_VAR, FAULT_VAR,
    "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME", "MALLOC_MMAP_THRESHOLD_",
)
# DeepSpeed's multi-node runners copy every launcher variable with these prefixes onto the command
# line they log (runner.py EXPORT_ENVS and the CUDA accelerator's export_envs, 0.19.8).
DEEPSPEED_FORWARDED = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


def launcher_command(stage: Stage, stage_dirs: list[StageDir], master_addr: str, master_port: int, deepspeed_bin: str, hostfile: str | None,
                     program: list[str] | None = None) -> list[str]:
    """The exact argv that starts one launch on all its ranks: the stages of `stage_dirs`, in order
    (one, or a group that swaps the engine in the running ranks), on the topology of `stage`.
    program: another script and its arguments in the worker's place, on the same topology (bench/)."""
    cluster = stage.cluster
    argv = [deepspeed_bin]
    if cluster.launcher == "local":
        argv += ["--num_nodes", "1", "--num_gpus", str(stage.procs_per_node)]
    else:
        argv += ["--hostfile", str(hostfile), "--launcher", cluster.launcher, "--num_nodes", str(stage.nodes)]
        if cluster.launcher == "pdsh" or stage.accelerator == "cuda":
            argv += ["--num_gpus", str(stage.procs_per_node)]
        if cluster.launcher == "slurm":
            # DeepSpeed ssh-checks the first host even for --launcher slurm.
            argv += ["--no_ssh_check", f"--launcher_args={SRUN_ARGS}"]
    if cluster.include:
        argv += ["--include", cluster.include]
    if cluster.exclude:
        argv += ["--exclude", cluster.exclude]
    argv += ["--master_addr", master_addr, "--master_port", str(master_port)]
    argv += cluster.launcher_args
    if program is not None:
        return argv + program
    argv += [str(WORKER_SCRIPT)] if cluster.launcher == "slurm" else ["--module", WORKER_MODULE]
    for stage_dir in stage_dirs:
        argv += ["--stage", str(stage_dir.stage_json)]
    return argv


def rank_environment(stage: Stage, base: dict[str, str], master_addr: str, master_port: int) -> dict[str, str]:
    """Variables every rank needs, on this node and on remote ones."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # Silence the tokenizers fork warning; data loading is in the main process.
        "TOKENIZERS_PARALLELISM": "false",
        # srun starts the worker without RANK & co.; the worker maps SLURM_* and needs these.
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if stage.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    # A fixed glibc mmap threshold: buffers over 64 KiB (gathered ZeRO-3 parameters, buckets)
    # go back to the system when freed. With glibc's adaptive threshold they stayed in the heap:
    # 5.5 GB against 4.0 GB peak per rank (309M params, ZeRO-3, world size 2, measured).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.update({key: base[key] for key in PASSED_THROUGH if base.get(key)})
    if "TORCH_CUDA_ARCH_LIST" in env:
        # DeepSpeed 0.19.8's op builder cannot parse arch suffixes like "9.0a".
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(a.rstrip("a") for a in env["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a)
    env.update(stage.cluster.env)
    return env


def split_secrets(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the plain variables, the secrets) of env."""
    plain = {key: value for key, value in env.items() if not is_secret(key)}
    return plain, {key: value for key, value in env.items() if key not in plain}


def launcher_environment(launcher: str, base: dict[str, str], rank_env: dict[str, str]) -> dict[str, str]:
    """The `deepspeed` launcher's environment: base plus the ranks' variables, less the secrets it
    would print. The single-node runner prints none and its ranks inherit them; the slurm runner
    prints the DEEPSPEED_FORWARDED ones and srun passes the rest on (--export=ALL); pdsh ranks
    get nothing from it but what it prints, so it holds no secret (they read the secrets file)."""
    def printed(name: str) -> bool:
        if launcher == "local" or not is_secret(name):
            return False
        return launcher == "pdsh" or name.startswith(DEEPSPEED_FORWARDED)

    return {key: value for key, value in {**base, **rank_env}.items() if not printed(key)}


def deepspeed_env_file(env: dict[str, str]) -> str:
    """Contents of .deepspeed_env: KEY=VAL lines, no blank line (it crashes the runner), no secret
    (the runners log every line)."""
    plain, _ = split_secrets(env)
    return "".join(f"{key}={value}\n" for key, value in sorted(plain.items()) if value != "")


def shell_quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def deepspeed_binary(python: str) -> str:
    """The `deepspeed` script installed beside this Python, else the one on PATH."""
    candidate = Path(python).parent / "deepspeed"
    return str(candidate) if candidate.exists() else "deepspeed"
