"""`harness` command line: one table of subcommands, each a thin wrapper.

Exit codes: 0 done, 1 a stage failed (message names it and its log), 2 bad input
(nothing written, nothing launched), 75 a stage was preempted (rerun resumes),
130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.plan import PlanError
from harness.records import RunDir
from harness.records.token_store import parse_part
from harness.records.exit_codes import PREEMPTED


def cmd_plan(args) -> int:
    """Validate, resolve, write each stage's DeepSpeed config and launcher command; launch nothing."""
    from harness.launch.setup import prepare, write_setup
    from harness.stages import launch_name
    from harness.views.mixtures import print_mixtures
    from harness.views.tables import print_stages, print_stores

    setup = prepare(args.plan, args.out, force=args.force)
    launches = write_setup(setup)
    print_stages(setup, [group for group, _ in launches])
    print_stores(setup.stages, setup.plan.cache_dir)
    print_mixtures(setup.stages)
    for group, argv in launches:
        print(f"\n# {launch_name(group)}\n{' '.join(argv)}")
    print(f"\nwrote {setup.run.phases}/*/stage.json and ds_config.json (each launch takes the first free port from the one "
          "shown and writes the command it ran to command.txt)")
    return 0


def cmd_run(args) -> int:
    """Run every unfinished stage; a rerun skips done stages and resumes an interrupted one."""
    from harness.launch.orchestrator import run_stages
    from harness.launch.setup import prepare
    from harness.views.mixtures import mixture_warnings

    setup = prepare(args.plan, args.out, force=args.force)
    if setup.plan.cluster.launcher == "slurm" and "SLURM_JOB_NODELIST" not in os.environ:
        raise PlanError([("cluster.launcher", "slurm", "runs inside a SLURM allocation: use `harness submit`, or run under salloc/sbatch")])
    for line in mixture_warnings(setup.unfinished()):
        print(f"[harness] {line}")
    run_stages(setup, only=args.only, verbose=args.verbose)
    return 0


def cmd_submit(args) -> int:
    """SLURM: one sbatch job per unfinished stage, chained with afterok (or --single-job)."""
    from harness.launch.setup import prepare, write_setup
    from harness.launch.slurm import render_jobs, render_tokenize_job, submit_jobs
    from harness.records.token_store import META
    from harness.stages import required_stores

    setup = prepare(args.plan, args.out, force=args.force)
    write_setup(setup)
    jobs = render_jobs(setup.stages, setup.unfinished(), Path(args.plan), setup.run, args.single_job)
    to_build = [request for request in required_stores(setup.unfinished()) if not (request.folder / META).is_file()]
    if jobs and args.tokenize_parts and to_build:
        jobs.insert(0, render_tokenize_job(Path(args.plan), setup.run, setup.plan.slurm, setup.plan.name, args.tokenize_parts))
    if not jobs:
        print("every stage is done; nothing to submit")
        return 0
    if args.dry_run:
        print("\n".join(f"rendered {job.script}" for job in jobs))
        return 0
    for job in submit_jobs(jobs, setup.run):
        print(f"submitted {job.name}: job {job.job_id}")
    print(f"watch: harness status {args.out}")
    return 0


def cmd_configs(args) -> int:
    """Write the DeepSpeed configs that plans generate, one folder per plan (ds_configs/ in the repo)."""
    import json

    from harness.launch.setup import plan_configs

    for plan in args.plans:
        folder = Path(args.out) / Path(plan).stem
        folder.mkdir(parents=True, exist_ok=True)
        for name, config in plan_configs(plan).items():
            (folder / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        print(f"wrote {folder}")
    return 0


def cmd_demo(args) -> int:
    """The embedded default on 2 CPU ranks: pretrain (ZeRO-2), fine-tune (ZeRO-3), multistep cycles."""
    from harness.demo import write_demo_workspace
    from harness.launch.orchestrator import run_stages
    from harness.launch.setup import prepare

    out = Path(args.out)
    setup = prepare(write_demo_workspace(out), out)
    run_stages(setup, verbose=args.verbose)
    final = setup.run.stage(setup.stages[-1].index, setup.stages[-1].name).model
    print(
        f"\nThe final model is a Hugging Face folder: {final}\n"
        "Load it with:\n"
        "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"  model = AutoModelForCausalLM.from_pretrained('{final}')\n"
        f"  tokenizer = AutoTokenizer.from_pretrained('{final}')\n"
        f"Progress: harness status {out}    Curves: harness report {out}"
    )
    return 0


def cmd_status(args) -> int:
    """Where each stage of a run stands (with its SLURM job, if it was submitted)."""
    from harness.launch.slurm import job_state, recorded_jobs
    from harness.views.tables import print_status

    run = RunDir(Path(args.out))
    if not run.phases.is_dir():
        raise PlanError([("out", args.out, "a run folder made by `harness plan`, `run` or `submit`")])
    jobs = {index: job for job in recorded_jobs(run) for index in job.stages}
    print_status(run, jobs, {job.job_id: job_state(job.job_id) for job in jobs.values() if job.job_id})
    return 0


def cmd_report(args) -> int:
    """Loss curves across all stages (PNG) and a table of eval metrics per stage."""
    from harness.views.report import load_run, print_table, report_table, write_report

    png = write_report(args.out, args.png)
    run = load_run(args.out)
    print_table(report_table(run), run.title)
    print(f"wrote {png} and {RunDir(Path(args.out)).report_json}")
    return 0


def cmd_compare(args) -> int:
    """Overlay the loss curves of several runs and tabulate their final metrics."""
    import json

    from harness.views.report import compare_runs, print_table

    png = compare_runs(args.outs, args.png)
    print_table(json.loads(Path(png).with_name("compare.json").read_text()), "compare")
    print(f"wrote {png}")
    return 0


def cmd_tokenize(args) -> int:
    """Build the plan's token stores now (as `run` does before launching), e.g. as a CPU job of its own;
    --part I/N builds part I of N of each (one per node or SLURM array task; the last part joins)."""
    from harness.launch.jobs import build_stores
    from harness.launch.setup import validated_stages
    from harness.stages import required_stores

    _, stages, _ = validated_stages(args.plan)
    build_stores(required_stores(stages), part=args.part)
    return 0


def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of parts, 1 or more")
    return int(text)


def _stage_numbers(text: str) -> set[int]:
    """'3' -> {3}; '3-6' -> {3, 4, 5, 6}."""
    first, _, last = text.partition("-")
    try:
        numbers = set(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a stage number N or a range N-M") from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"{text!r}: an empty range")
    return numbers


COMMANDS = {
    "demo": cmd_demo,
    "plan": cmd_plan,
    "run": cmd_run,
    "status": cmd_status,
    "submit": cmd_submit,
    "configs": cmd_configs,
    "tokenize": cmd_tokenize,
    "report": cmd_report,
    "compare": cmd_compare,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Train language models in phases with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's data, plan and run (default: runs/demo)")
    demo.add_argument("--verbose", action="store_true", help="show everything the launcher prints (DeepSpeed's own lines too)")
    for name in ("plan", "run", "submit"):
        p = sub.add_parser(name, help=COMMANDS[name].__doc__)
        p.add_argument("plan", help="plan YAML file")
        p.add_argument("--out", required=True, help="run folder (rerun with the same folder to resume)")
        p.add_argument("--force", action="store_true", help="continue a run folder whose plan changed (finished stages are kept)")
        if name == "run":
            p.add_argument("--only", type=_stage_numbers, default=None, metavar="N[-M]",
                           help="run only stage number N, or stages N to M (what each SLURM job does)")
            p.add_argument("--verbose", action="store_true", help="show everything the launcher prints (DeepSpeed's own lines too)")
        if name == "submit":
            p.add_argument("--single-job", action="store_true", help="one allocation for every stage instead of one job per stage")
            p.add_argument("--dry-run", action="store_true", help="render the sbatch scripts under <out>/slurm/, submit nothing")
            p.add_argument("--tokenize-parts", type=_count, default=0, metavar="N",
                           help="first a job array of N CPU tasks that builds the token stores (`harness tokenize --part I/N`); the stages wait for it")
    tokenize = sub.add_parser("tokenize", help=cmd_tokenize.__doc__)
    tokenize.add_argument("plan", help="plan YAML file")
    tokenize.add_argument("--part", type=_part, default=(1, 1), metavar="I/N",
                          help="build part I of N of each store (pieces of about 1/N of the input); the part that finds every piece there joins them")
    configs = sub.add_parser("configs", help=cmd_configs.__doc__)
    configs.add_argument("plans", nargs="+", help="plan YAML files")
    configs.add_argument("--out", default="ds_configs", help="folder (default: ds_configs)")
    status = sub.add_parser("status", help=cmd_status.__doc__)
    status.add_argument("out", help="run folder")
    report = sub.add_parser("report", help=cmd_report.__doc__)
    report.add_argument("out", help="run folder")
    report.add_argument("--png", default=None, help="where to write the plot (default: <out>/report.png)")
    compare = sub.add_parser("compare", help=cmd_compare.__doc__)
    compare.add_argument("outs", nargs="+", help="two or more run folders")
    compare.add_argument("--png", default="compare.png", help="where to write the plot (default: ./compare.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.launch.orchestrator import StageFailed

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PlanError as error:
        print(f"harness {args.command}: {error.message()}", file=sys.stderr)
        return 2
    except StageFailed as error:
        print(f"harness {args.command}: {error}", file=sys.stderr)
        return PREEMPTED if error.exit_code == PREEMPTED else 1
    except KeyboardInterrupt:
        print(f"\nharness {args.command}: interrupted; every rank was stopped. Rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
