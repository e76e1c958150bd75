"""`harness submit`: one sbatch job per launch (a stage, or consecutive stages that share a launch),
chained with afterok, and the jobs' states.

Each job runs `harness run <plan> --out <run> --only <N>[-<M>]` inside its allocation: the
same orchestrator, so validation, resume and the handoff are the same as on a
workstation. `--single-job` runs every stage in one allocation instead.
No torch here; SLURM is reached through sbatch and scontrol (sacct needs accounting,
which small clusters often lack).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from string import Template

from harness.launch.command import shell_quote
from harness.plan import SlurmSpec
from harness.records import RunDir, SlurmJob, SlurmJobs
from harness.records.exit_codes import PREEMPTED
from harness.stages import Stage, launch_groups, launch_name

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "stage.sbatch"
TOKENIZE_TEMPLATE = TEMPLATE.with_name("tokenize.sbatch")
TOKENIZE_JOB = "tokenize"


def sbatch_options(spec: SlurmSpec, accelerator: str, procs_per_node: int) -> list[str]:
    """The plan's optional sbatch lines."""
    options = []
    for flag, value in (("partition", spec.partition), ("account", spec.account), ("qos", spec.qos), ("cpus-per-task", spec.cpus_per_task)):
        if value is not None:
            options.append(f"--{flag}={value}")
    gpus = spec.gpus_per_node if spec.gpus_per_node is not None else (procs_per_node if accelerator == "cuda" else 0)
    if gpus:
        options.append(f"--gpus-per-node={gpus}")
    return options + spec.extra


def render_sbatch(*, job_name: str, what: str, nodes: int, tasks_per_node: int, accelerator: str, spec: SlurmSpec,
                  command: list[str], workdir: Path, log: Path, stop_file: Path) -> str:
    """The batch script of one job. Pure."""
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job_name,
        what=what,
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        time=spec.time,
        grace_s=spec.preempt_grace_s,
        log=log,
        options="".join(f"#SBATCH {option}\n" for option in sbatch_options(spec, accelerator, tasks_per_node)),
        workdir=workdir,
        stop_file=stop_file,
        command=shell_quote(command),
        preempted=PREEMPTED,
        max_requeues=spec.max_requeues,
    )


def render_tokenize_job(plan_path: Path, run: RunDir, spec: SlurmSpec, run_name: str, parts: int) -> SlurmJob:
    """The job array that tokenizes the run's token stores in `parts` parts, one CPU task each
    (`harness tokenize --part I/N`), written under <run>/slurm/. Pure but for writing the script."""
    run.slurm.mkdir(parents=True, exist_ok=True)
    script = run.slurm_script(TOKENIZE_JOB)
    cpu_only = spec.model_copy(update={"gpus_per_node": 0})  # tokenizing uses no GPU
    script.write_text(Template(TOKENIZE_TEMPLATE.read_text()).substitute(
        job_name=f"{run_name}:{TOKENIZE_JOB}",
        parts=parts,
        time=spec.time,
        log=run.slurm / f"{TOKENIZE_JOB}-%A-%a.out",
        options="".join(f"#SBATCH {option}\n" for option in sbatch_options(cpu_only, "cpu", 0)),
        workdir=run.root,
        command=shell_quote([sys.executable, "-m", "harness.cli", "tokenize", str(plan_path.resolve())]),
    ))
    return SlurmJob(name=TOKENIZE_JOB, script=str(script), stages=[])


def render_jobs(stages: list[Stage], unfinished: list[Stage], plan_path: Path, run: RunDir, single_job: bool) -> list[SlurmJob]:
    """Write one script per launch of the unfinished stages (stages.launch_groups: a stage, or
    consecutive stages that swap the engine in one launch), or one for the whole run, under <run>/slurm/."""
    run.slurm.mkdir(parents=True, exist_ok=True)
    harness = [sys.executable, "-m", "harness.cli", "run", str(plan_path.resolve()), "--out", str(run.root)]
    if single_job:
        groups = [("all", [s for s in stages], harness, "every stage of the run")]
    else:
        groups = [_job_of(launch, harness) for launch in launch_groups(stages, {s.index for s in unfinished})]
    jobs = []
    for name, members, command, what in groups:
        script = run.slurm_script(name)
        script.write_text(render_sbatch(
            job_name=f"{members[0].run_name}:{name}",
            what=what,
            nodes=max(s.nodes for s in members),
            tasks_per_node=max(s.procs_per_node for s in members),
            accelerator=members[0].accelerator,
            spec=members[0].slurm,
            command=command,
            workdir=run.root,
            log=run.slurm_log(name),
            stop_file=run.slurm_stop(name),
        ))
        jobs.append(SlurmJob(name=name, script=str(script), stages=[s.index for s in members]))
    return jobs


def _job_of(launch: list[Stage], harness: list[str]) -> tuple[str, list[Stage], list[str], str]:
    """(job name, stages, command, what it runs) of the job that runs one launch."""
    first, last = launch[0], launch[-1]
    if first is last:
        return f"{first.index:02d}-{first.name}", launch, harness + ["--only", str(first.index)], launch_name(launch)
    return f"{first.index:02d}-{last.index:02d}", launch, harness + ["--only", f"{first.index}-{last.index}"], launch_name(launch)


def submit_jobs(jobs: list[SlurmJob], run: RunDir) -> list[SlurmJob]:
    """sbatch each job, each depending (afterok) on the one before (on a job array: on every task of
    it); record ids in <run>/slurm/jobs.json."""
    previous = None
    for job in jobs:
        dependency = [f"--dependency=afterok:{previous}"] if previous else []
        result = subprocess.run(["sbatch", "--parsable", *dependency, job.script], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {job.script} failed: {result.stderr.strip()}")
        job.job_id = result.stdout.strip().split(";")[0]
        previous = job.job_id
    SlurmJobs(jobs=jobs).write(run.slurm_jobs)
    return jobs


def recorded_jobs(run: RunDir) -> list[SlurmJob]:
    return SlurmJobs.read(run.slurm_jobs).jobs if run.slurm_jobs.exists() else []


def job_state(job_id: str) -> dict[str, str]:
    """JobState, Reason, ExitCode, Restarts of a job from `scontrol show job`; once SLURM has
    purged the job (MinJobAge) JobState is "PURGED"; if scontrol fails, "UNKNOWN" and its error."""
    try:
        output = scontrol("show", "job", "-o", job_id)
    except subprocess.CalledProcessError as error:
        purged = "Invalid job id" in error.stderr
        return {"JobState": "PURGED" if purged else "UNKNOWN", "Reason": "" if purged else error.stderr.strip()[:80], "ExitCode": "", "Restarts": ""}
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"JobState": "UNKNOWN", "Reason": str(error), "ExitCode": "", "Restarts": ""}
    fields = scontrol_fields(output)
    return {k: fields.get(k, "") for k in ("JobState", "Reason", "ExitCode", "Restarts")}


def scontrol(*args: str) -> str:
    """What `scontrol ARGS` prints; raises CalledProcessError (with its stderr) when it fails."""
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def scontrol_fields(output: str) -> dict[str, str]:
    """The Key=Value fields of one `scontrol show ... -o` record."""
    return dict(field.split("=", 1) for field in output.split() if "=" in field)
