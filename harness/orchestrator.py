"""The launch side: validate a plan, write each stage's files, run the stages in order.

Each stage is its own `deepspeed` launcher process group with a fresh master
port. A stage succeeded when the launcher exited 0 AND its manifest (written
by rank 0 after a final barrier) is valid. A rerun skips done stages, and the
worker resumes an interrupted stage from its latest checkpoint.
Never imports torch; never ends a process it did not start.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.exit_codes import PREEMPTED
from harness.ds_config import check_ds_config, get_train_ds_config, validate_with_deepspeed
from harness.launch import deepspeed_binary, deepspeed_env_file, hostfile_hosts, hostfile_text, launcher_command, rank_environment, shell_quote
from harness.layout import RunDir, StageDir
from harness.manifest import manifest_written, valid_manifest, write_atomic
from harness.plan import DataSpec, Plan, PlanError, load_plan
from harness.stages import Stage, eval_size, expand_stages
from harness.wandb_mode import resolve_mode


@dataclass
class RunSetup:
    """A validated plan, its stages and their DeepSpeed configs, bound to an output folder."""

    plan_text: str
    plan: Plan
    stages: list[Stage]
    configs: list[dict[str, Any]]
    run: RunDir


class StageFailed(Exception):
    """A stage's launcher failed or left no valid manifest."""

    def __init__(self, stage: Stage, stage_dir: StageDir, exit_code: int, detail: str):
        self.exit_code = exit_code
        super().__init__(
            f"stage {stage.index:02d} '{stage.name}' (phase '{stage.phase}') failed: {detail} (exit code {exit_code}).\n"
            f"  log: {stage_dir.launcher_log}\n"
            f"  rerun the same command to resume it from its latest checkpoint."
        )


def detect_accelerator(choice: str) -> str:
    """'cuda' when asked or when nvidia-smi lists a GPU, else 'cpu'."""
    if choice != "auto":
        return choice
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if "GPU" in listing else "cpu"


def count_train_rows(spec: DataSpec) -> int:
    """Rows of a fine-tune data set that are trained on (all rows minus the eval hold-out)."""
    rows = 0
    for file in spec.files:
        if spec.resolved_format() == "parquet":
            import pyarrow.parquet

            rows += pyarrow.parquet.ParquetFile(file).metadata.num_rows
        else:
            with open(file) as f:
                rows += sum(1 for line in f if line.strip())
    return rows - eval_size(rows, spec)


def validated_stages(plan_path: str | Path) -> tuple[Plan, list[Stage], list[dict[str, Any]]]:
    """The plan, its stages and their DeepSpeed configs, all checked; raises PlanError on any problem."""
    plan = load_plan(plan_path)
    stages = expand_stages(plan, detect_accelerator(plan.cluster.accelerator), count_train_rows)
    configs = [get_train_ds_config(stage) for stage in stages]
    problems = []
    for stage, config in zip(stages, configs):
        problems += [(f"stage '{stage.name}' deepspeed config", config.get("train_batch_size"), p) for p in check_ds_config(config, stage.world_size)]
    problems += [(f"stage '{stages[index].name}' deepspeed", None, problem) for index, problem in validate_with_deepspeed(configs)]
    if problems:
        raise PlanError(problems)
    return plan, stages, configs


def plan_configs(plan_path: str | Path) -> dict[str, dict[str, Any]]:
    """'<NN>-<stage>' -> DeepSpeed config, for every stage of a plan."""
    _, stages, configs = validated_stages(plan_path)
    return {f"{stage.index:02d}-{stage.name}": config for stage, config in zip(stages, configs)}


def prepare(plan_path: str | Path, out: str | Path, force: bool = False) -> RunSetup:
    """Validate everything before anything is written; raises PlanError on any problem."""
    plan, stages, configs = validated_stages(plan_path)
    setup = RunSetup(Path(plan_path).read_text(), plan, stages, configs, RunDir(Path(out).resolve()))
    _check_same_plan(setup, force)
    return setup


def _check_same_plan(setup: RunSetup, force: bool) -> None:
    digest_file = setup.run.plan_digest
    if digest_file.exists() and digest_file.read_text().strip() != _digest(setup.plan_text) and not force:
        raise PlanError([(
            "--out", str(setup.run.root),
            "holds a run of a different plan; use another --out, or --force to continue it with this plan "
            "(finished stages are kept as they are)",
        )])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_setup(setup: RunSetup) -> list[list[str]]:
    """Write the plan copy and every unfinished stage's files; return each stage's launcher argv
    (as `harness plan` shows it: the port is the first one tried). A finished stage's files are
    left untouched: they record what ran."""
    run = setup.run
    run.phases.mkdir(parents=True, exist_ok=True)
    run.plan_copy.write_text(setup.plan_text)
    run.plan_digest.write_text(_digest(setup.plan_text) + "\n")
    commands = []
    previous: StageDir | None = None
    for stage, config in zip(setup.stages, setup.configs):
        stage_dir = run.stage(stage.index, stage.name)
        argv = launcher_command(stage, stage_dir, stage.cluster.master_addr, _first_port(stage), deepspeed_binary(sys.executable), _hostfile_path(stage, stage_dir))
        commands.append(argv)
        if not manifest_written(stage_dir.manifest):
            stage_dir.root.mkdir(parents=True, exist_ok=True)
            stage_file = {"stage": stage.model_dump(mode="json"), "previous": str(previous.root) if previous else None, "run_dir": str(run.root)}
            stage_dir.stage_json.write_text(json.dumps(stage_file, indent=2) + "\n")
            stage_dir.ds_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            stage_dir.command.write_text(shell_quote(argv) + "\n")
        previous = stage_dir
    return commands


def _first_port(stage: Stage) -> int:
    """The first master port tried for a stage; `run` takes the first free one from here."""
    return (stage.cluster.master_port or 29500) + stage.index


def _hostfile_path(stage: Stage, stage_dir: StageDir) -> str | None:
    """The plan's hostfile, or the one the stage writes (from the host list or the SLURM allocation)."""
    if stage.cluster.launcher == "local":
        return None
    if stage.cluster.hostfile and "SLURM_JOB_NODELIST" not in os.environ:
        return stage.cluster.hostfile
    return str(stage_dir.root / "hostfile")


def resolve_hosts(stage: Stage, stage_dir: StageDir) -> tuple[str | None, list[str], str]:
    """(hostfile, hosts in node-rank order, master address) for this launch. Inside a SLURM
    allocation they come from SLURM_JOB_NODELIST, rank 0 on the first node, at its NodeAddr."""
    cluster = stage.cluster
    hostfile = _hostfile_path(stage, stage_dir)
    if hostfile is None:
        return None, [], cluster.master_addr
    if "SLURM_JOB_NODELIST" in os.environ:
        hosts = _scontrol("show", "hostnames", os.environ["SLURM_JOB_NODELIST"]).split()
        Path(hostfile).write_text(hostfile_text(hosts, stage.procs_per_node))
        return hostfile, hosts, _node_address(hosts[0])
    if cluster.hosts:
        Path(hostfile).write_text(hostfile_text(cluster.hosts, stage.procs_per_node))
    return hostfile, hostfile_hosts(Path(hostfile).read_text()), cluster.master_addr


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def _node_address(node: str) -> str:
    """A SLURM node's NodeAddr (its name need not resolve, e.g. on a test cluster)."""
    fields = dict(f.split("=", 1) for f in _scontrol("show", "node", "-o", node).split() if "=" in f)
    return fields.get("NodeAddr", node)


def free_port(start: int) -> int:
    """The first port from `start` that nothing listens on and nothing holds in TIME_WAIT."""
    for port in range(start, start + 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 199}")


def run_stages(setup: RunSetup, only: int | None = None, echo: Callable[[str], None] = print) -> None:
    """Run every unfinished stage in order (or only stage number `only`); raises StageFailed at
    the first failure."""
    write_setup(setup)
    for stage in setup.stages:
        if only is not None and stage.index != only:
            continue
        stage_dir = setup.run.stage(stage.index, stage.name)
        if valid_manifest(stage_dir.manifest) is not None:
            echo(f"[harness] stage {stage.index:02d} {stage.name}: done, skipped")
            continue
        echo(f"[harness] stage {stage.index:02d} {stage.name}: {stage.kind}, ZeRO-{stage.settings.zero_stage}, "
             f"{stage.world_size} rank(s), {stage.optimizer_type}, {stage.steps} steps")
        exit_code = launch_stage(stage, stage_dir)
        if exit_code != 0:
            detail = "stopped on request (preemption) after saving a checkpoint" if exit_code == PREEMPTED else "the launcher reported a failure"
            raise StageFailed(stage, stage_dir, exit_code, detail)
        if valid_manifest(stage_dir.manifest) is None:
            raise StageFailed(stage, stage_dir, exit_code, "no valid manifest.json was written")
        collect_metrics(setup.run)
    if only is None:
        echo(f"[harness] all {len(setup.stages)} stage(s) done; final model: {setup.run.stage(setup.stages[-1].index, setup.stages[-1].name).model}")


def collect_metrics(run: RunDir) -> None:
    """<out>/metrics.jsonl: the stages' metric lines in run order, one file for the whole run."""
    lines = "".join(d.metrics.read_text() for d in run.stage_dirs() if d.metrics.exists())
    write_atomic(run.metrics, lines)


def launch_stage(stage: Stage, stage_dir: StageDir) -> int:
    """Start the stage's launcher in its own process group, stream its output, return its exit code.
    Ctrl-C or SIGTERM stops that launch and every rank it started (and nothing else), then re-raises."""
    hostfile, hosts, master_addr = resolve_hosts(stage, stage_dir)
    port = free_port(_first_port(stage))
    argv = launcher_command(stage, stage_dir, master_addr, port, deepspeed_binary(sys.executable), hostfile)
    stage_dir.command.write_text(shell_quote(argv) + "\n")
    rank_env = {**rank_environment(stage, dict(os.environ), master_addr, port), "WANDB_MODE": resolve_mode(stage.wandb.mode)}
    env_file = stage_dir.root / ".deepspeed_env"
    env_file.write_text(deepspeed_env_file(rank_env))
    shutil.rmtree(stage_dir.ranks, ignore_errors=True)  # rank files of an earlier attempt
    env = {**os.environ, **rank_env, "DS_ENV_FILE": str(env_file)}
    with open(stage_dir.launcher_log, "ab") as log:
        log.write(f"\n[harness] {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_quote(argv)}\n".encode())
        process = subprocess.Popen(argv, cwd=stage_dir.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            _stream(process, log)
            return process.wait()
        except KeyboardInterrupt:
            stop_launch(process, stage, stage_dir, hosts)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_term)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stream(process: subprocess.Popen, log) -> None:
    out = sys.stdout.buffer
    fd = process.stdout.fileno()
    while chunk := os.read(fd, 65536):
        log.write(chunk)
        out.write(chunk)
        out.flush()


def stop_launch(process: subprocess.Popen, stage: Stage, stage_dir: StageDir, hosts: list[str], grace_s: float = 10.0) -> None:
    """End a launch: the launcher's process group, then any rank still alive, by its recorded PID.

    DeepSpeed's pdsh runner answers SIGTERM by running `pkill -f` on every host (0.19.8), which
    can kill other people's runs: it gets SIGKILL, and its remote ranks are ended over ssh.
    The single-node runner leaves its ranks running on SIGTERM: its whole group is signalled."""
    if stage.cluster.launcher == "pdsh":
        _signal_group(process, signal.SIGKILL)
    else:
        _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        _signal_group(process, signal.SIGKILL)
    process.wait()
    end_ranks(stage_dir, hosts if stage.cluster.launcher == "pdsh" else [])


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def end_ranks(stage_dir: StageDir, hosts: list[str]) -> None:
    """SIGKILL each rank of this stage and its per-node launcher, by the PIDs the ranks recorded,
    only if that PID still runs this stage (its command line names this stage's stage.json).
    Ranks of node k are reached over ssh at hosts[k]; with no hosts, on this machine."""
    marker = shlex.quote(str(stage_dir.stage_json))
    for rank_file in sorted(stage_dir.ranks.glob("rank*.json")):
        rank = json.loads(rank_file.read_text())
        kills = " ; ".join(
            f"tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -qF -- {marker} && kill -KILL {pid}"
            for pid in (rank["launcher_pid"], rank["pid"])
        )
        command = ["bash", "-c", kills + " ; true"]
        if hosts:
            command = ["ssh", "-o", "BatchMode=yes", hosts[rank["node_rank"]], kills + " ; true"]
        subprocess.run(command, capture_output=True, timeout=30)


@dataclass
class StageStatus:
    """Where one stage stands, read from its folder."""

    index: int
    name: str
    state: str
    steps: str
    loss: float | None
    checkpoint: str | None
    load_mode: str | None


def stage_statuses(run: RunDir) -> list[StageStatus]:
    """One status per stage folder, for `harness status`."""
    statuses = []
    for stage_dir in run.stage_dirs():
        index, name = stage_dir.root.name.split("-", 1)
        stage = json.loads(stage_dir.stage_json.read_text())["stage"] if stage_dir.stage_json.exists() else {}
        manifest = valid_manifest(stage_dir.manifest)
        checkpoint = stage_dir.latest_checkpoint()
        rows = _metric_rows(stage_dir)
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        done_steps = manifest["stage_steps"] if manifest else (rows[-1]["stage_step"] if rows else 0)
        if manifest:
            state = "done"
        elif checkpoint or rows:
            state = "interrupted"
        else:
            state = "pending"
        statuses.append(StageStatus(
            index=int(index),
            name=name,
            state=state,
            steps=f"{done_steps}/{stage.get('steps', '?')}",
            loss=losses[-1] if losses else None,
            checkpoint=checkpoint,
            load_mode=(manifest or {}).get("load", {}).get("mode") or _load_mode_in_progress(stage_dir),
        ))
    return statuses


def _metric_rows(stage_dir: StageDir) -> list[dict[str, Any]]:
    if not stage_dir.metrics.exists():
        return []
    rows = []
    for line in stage_dir.metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _load_mode_in_progress(stage_dir: StageDir) -> str | None:
    started = stage_dir.root / "started.json"
    return json.loads(started.read_text())["load"]["mode"] if started.exists() else None
