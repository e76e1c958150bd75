"""Weights & Biases for one stage: one W&B run per stage, every stage of a run in one group.

Called on global rank 0 only (other ranks get a NullMonitor). The contract is the
one MetricsLog forwards to: log(row) and close(), plus `run_id` (stored in the
stage manifest) and log_model(path).

- Run id `<plan name>-<key>-sNN`: the key is a random token written once into the
  run folder (`wandb_id.txt`), so a resumed or requeued stage reopens the SAME
  W&B run (resume="allow"), while a new run in a reused folder path (rm -rf, rerun)
  does not append to the old runs of that path.
- Group: the plan's `wandb.group`, default `<plan name>-<key>`; job_type = stage kind;
  name = stage name; config = the resolved stage, its DeepSpeed config, ZeRO stage
  and world size.
- Every row is logged at W&B step = global_step (it grows across stages and is the
  same after a resume, so an offline resumed segment syncs into place) and the
  charts use global_step as x axis (define_metric), so phase 2 does not restart at 0.
- Files go to `<run dir>/wandb/` (offline runs: `wandb sync <run dir>/wandb/offline-run-*`).
- Any W&B failure (import, bad settings, unwritable folder, network) prints one
  warning line and the stage trains on without W&B.
"""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from harness.records import RunDir, StageDir
from harness.stages import Stage
from harness.worker.metrics import NullMetrics

# Dense bf16/fp16 tensor-core peak per GPU, for the MFU estimate (by device name).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


class NullMonitor(NullMetrics):
    """No W&B: other ranks, mode disabled, or after a W&B failure."""

    run_id: str | None = None

    def log_model(self, path: Path) -> None:
        pass


class WandbMonitor(NullMonitor):
    """Forwards MetricsLog rows to one W&B run; stops quietly (one warning) if W&B fails."""

    def __init__(self, wandb, run, stage: Stage, own_steps: bool, params: int | None):
        self.wandb = wandb
        self.run = run
        self.run_id = run.id
        self.stage = stage
        self.own_steps = own_steps
        """False when the run is DeepSpeed's: it logs at step=global_samples, ours would be dropped."""
        self.peak = _peak_flops(stage) if params else None
        self.params = params

    def log(self, row: dict[str, Any]) -> None:
        """Log the numeric values of a row (strings like the stage name are in the config)."""
        if self.run is None or not self._wanted(row):
            return
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.peak and "train/tokens_per_s" in values:
            # tokens/s is summed over all ranks: divide by the peak of all GPUs.
            values["train/mfu"] = 6 * self.params * values["train/tokens_per_s"] / (self.peak * self.stage.world_size)
        self._guard(lambda: self.run.log(values, step=values["global_step"] if self.own_steps else None))

    def _wanted(self, row: dict[str, Any]) -> bool:
        """wandb.log_every thins train rows; eval rows and a stage's last row always go."""
        every = self.stage.wandb.log_every
        return row["global_step"] % every == 0 or any(k.startswith("eval/") for k in row) or row["stage_step"] == self.stage.steps

    def log_model(self, path: Path) -> None:
        """Record the stage's Hugging Face model folder as a W&B artifact by reference
        (file:// URI with checksums; nothing is uploaded). Only with `wandb.log_model: true`."""
        if self.run is None or not self.stage.wandb.log_model:
            return

        def log() -> None:
            artifact = self.wandb.Artifact(f"model-{self.run_id}", type="model",
                                           metadata={"stage": self.stage.name, "phase": self.stage.phase, "kind": self.stage.kind})
            artifact.add_reference(Path(path).resolve().as_uri(), name="model")
            self.run.log_artifact(artifact, aliases=["latest"])

        self._guard(log)

    def close(self) -> None:
        """Finish the run (exit code 1 when an exception is on its way out) and wait until
        its files are written: finish() returns before the wandb service has flushed them,
        and the worker leaves with os._exit, which skips wandb's own atexit teardown."""
        if self.run is not None:
            failed = sys.exc_info()[0] is not None
            self._guard(lambda: self.run.finish(exit_code=1 if failed else 0))
            self._guard(self.wandb.teardown)
            self.run = None

    def _guard(self, action) -> None:
        try:
            action()
        except Exception as error:  # W&B must never stop training
            warn(self.stage, error)
            self.run = None


def start_monitor(stage: Stage, run_dir: RunDir, stage_dir: StageDir, model=None) -> NullMonitor:
    """The stage's W&B monitor (rank 0 only), or a NullMonitor when W&B is off or fails.

    DeepSpeed's own monitors, in the stage's `deepspeed:` block (DeepSpeed 0.19.8,
    deepspeed/monitor/): `wandb: {enabled: true}` makes the engine call a plain
    `wandb.init(project, group, entity)` on rank 0 during deepspeed.initialize (before
    this runs) and then `wandb.log({"Train/Samples/lr": ...}, step=global_samples)` on
    the global run every optimizer step. A second wandb.init here would only return
    that run (wandb's reinit default "return_previous"), so we adopt it instead: our
    rows and config go into DeepSpeed's run (one run per stage), logged without an
    explicit step so they merge with its samples-based steps, and we finish it at the
    end (the worker leaves with os._exit, which skips wandb's own exit hook). That run
    keeps DeepSpeed's random id, its group/project/team, and the folder `<stage dir>/wandb`,
    so it is not resumable: leave DeepSpeed's wandb block off to get the plan's grouped,
    resumable runs. `tensorboard` and `csv_monitor` write their own files and never reach
    W&B (we do not sync TensorBoard), so nothing is logged twice.
    """
    spec, mode = stage.wandb, stage.wandb_mode
    if mode == "disabled":
        return NullMonitor()
    try:
        import wandb

        ds_config = json.loads(stage_dir.ds_config.read_text())
        config = run_config(stage, ds_config)
        params = _count_params(model) if model is not None and stage.accelerator == "cuda" else None
        if ds_config.get("wandb", {}).get("enabled"):
            run = wandb.run
            if run is None:
                raise RuntimeError("DeepSpeed's wandb monitor is enabled but no W&B run is active")
            if run.disabled:  # WANDB_MODE=disabled reached DeepSpeed's wandb.init
                return NullMonitor()
            run.config.update(config, allow_val_change=True)
            run.name = stage.name
            own_steps = False
        else:
            # wandb writes into <dir>/wandb/ and falls back to /tmp when it cannot create it: fail here instead.
            run_dir.wandb.mkdir(parents=True, exist_ok=True)
            key = run_key(run_dir)
            run = wandb.init(
                project=spec.project,
                entity=spec.entity,
                group=spec.group or f"{stage.run_name}-{key}",
                job_type=stage.kind,
                name=stage.name,
                tags=list(spec.tags),
                config=config,
                id=wandb_run_id(stage, key),
                resume="allow",
                dir=str(run_dir.root),
                mode=mode,
                settings=wandb.Settings(quiet=True),
            )
            own_steps = True
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")
        return WandbMonitor(wandb, run, stage, own_steps, params)
    except Exception as error:  # ImportError, wandb's UsageError/CommError, OSError, ...
        warn(stage, error)
        return NullMonitor()


def run_key(run_dir: RunDir) -> str:
    """8 hex digits created once per run folder (first stage that starts W&B) and read ever after."""
    path = run_dir.wandb_key
    try:
        with open(path, "x") as f:  # exclusive create: an existing key is never replaced
            f.write(secrets.token_hex(4) + "\n")
    except FileExistsError:
        pass
    return path.read_text().strip()


def wandb_run_id(stage: Stage, key: str) -> str:
    """W&B run id of a stage: the same for every attempt of that stage in this run folder."""
    return f"{stage.run_name[:40]}-{key}-s{stage.index:02d}"


def run_config(stage: Stage, ds_config: dict[str, Any]) -> dict[str, Any]:
    """W&B config: the resolved stage, the exact DeepSpeed config, ZeRO stage and world size.
    Values of cluster.env are hidden: they may hold tokens."""
    config = stage.model_dump(mode="json")
    config["cluster"]["env"] = {k: "<hidden>" for k in config["cluster"]["env"]}
    config.update(deepspeed=ds_config, zero_stage=stage.zero_stage, world_size=stage.world_size)
    return config


def warn(stage: Stage, error: BaseException) -> None:
    """One line on the console: what failed, and that training goes on."""
    message = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
    print(f"[harness] warning: W&B off for stage {stage.name}: {type(error).__name__}: {message}; training continues", flush=True)


def _count_params(model) -> int:
    # Under ZeRO-3 the module's parameters are partitioned; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _peak_flops(stage: Stage) -> float | None:
    """Peak of one GPU for the stage's precision, when known (bf16/fp16 on listed GPUs)."""
    if stage.accelerator != "cuda" or stage.precision == "fp32":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for gpu, peak in PEAK_FLOPS.items() if gpu in name), None)
