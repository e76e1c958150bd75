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

from harness.exit_codes import PREEMPTED
from harness.layout import RunDir
from harness.plan import PlanError


def cmd_plan(args) -> int:
    """Validate, resolve, write each stage's DeepSpeed config and launcher command; launch nothing."""
    from harness.setup import prepare, write_setup

    setup = prepare(args.plan, args.out, force=args.force)
    from harness.console import launch_name

    launches = write_setup(setup)
    _print_stages(setup, [group for group, _ in launches])
    _print_stores(setup)
    for group, argv in launches:
        print(f"\n# {launch_name(group)}\n{' '.join(argv)}")
    print(f"\nwrote {setup.run.phases}/*/ds_config.json and command.txt (ports are chosen free at launch)")
    return 0


def cmd_run(args) -> int:
    """Run every unfinished stage; a rerun skips done stages and resumes an interrupted one."""
    from harness.orchestrator import run_stages
    from harness.setup import prepare

    setup = prepare(args.plan, args.out, force=args.force)
    if setup.plan.cluster.launcher == "slurm" and "SLURM_JOB_NODELIST" not in os.environ:
        raise PlanError([("cluster.launcher", "slurm", "runs inside a SLURM allocation: use `harness submit`, or run under salloc/sbatch")])
    run_stages(setup, only=args.only, verbose=args.verbose)
    return 0


def cmd_submit(args) -> int:
    """SLURM: one sbatch job per unfinished stage, chained with afterok (or --single-job)."""
    from harness.setup import prepare, write_setup
    from harness.slurm import render_jobs, submit_jobs

    setup = prepare(args.plan, args.out, force=args.force)
    write_setup(setup)
    jobs = render_jobs(setup.stages, setup.unfinished(), Path(args.plan), setup.run, args.single_job)
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

    from harness.setup import plan_configs

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
    from harness.orchestrator import run_stages
    from harness.setup import prepare

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
    from rich.console import Console
    from rich.table import Table

    from harness.status import stage_statuses
    from harness.slurm import job_state, recorded_jobs

    run = RunDir(Path(args.out))
    if not run.phases.is_dir():
        raise PlanError([("out", args.out, "a run folder made by `harness plan`, `run` or `submit`")])
    jobs = {index: job for job in recorded_jobs(run) for index in job.stages}
    table = Table(title=str(run.root))
    columns = ["#", "stage", "state", "steps", "loss", "checkpoint", "load mode"] + (["slurm job", "slurm state"] if jobs else [])
    for column in columns:
        table.add_column(column)
    for s in stage_statuses(run):
        row = [f"{s.index:02d}", s.name, s.state, s.steps, "-" if s.loss is None else f"{s.loss:.4f}", s.checkpoint or "-", s.load_mode or "-"]
        if jobs:
            job = jobs.get(s.index)
            row += [job.job_id or "-", _slurm_state(job_state(job.job_id)) if job and job.job_id else "-"] if job else ["-", "-"]
        table.add_row(*row)
    Console(width=160).print(table)
    return 0


def _slurm_state(state: dict[str, str]) -> str:
    text = state["JobState"]
    if state["Reason"] not in ("", "None"):
        text += f" ({state['Reason']})"
    if state["ExitCode"] not in ("", "0:0"):
        text += f", exit {state['ExitCode']}"
    if state["Restarts"] not in ("", "0"):
        text += f", requeued {state['Restarts']}x"
    return text


def cmd_report(args) -> int:
    """Loss curves across all stages (PNG) and a table of eval metrics per stage."""
    from harness.report import load_run, print_table, report_table, write_report

    png = write_report(args.out, args.png)
    print_table(report_table(load_run(args.out)), f"run {args.out}")
    print(f"wrote {png} and {RunDir(Path(args.out)).report_json}")
    return 0


def cmd_compare(args) -> int:
    """Overlay the loss curves of several runs and tabulate their final metrics."""
    import json

    from harness.report import compare_runs, print_table

    png = compare_runs(args.outs, args.png)
    print_table(json.loads(Path(png).with_name("compare.json").read_text()), "compare")
    print(f"wrote {png}")
    return 0


def cmd_tokenize(args) -> int:
    """Build the plan's token stores now (as `run` does before launching), e.g. as a CPU job of its own."""
    from harness.setup import validated_stages
    from harness.token_store import build_missing, required_stores

    _, stages, _ = validated_stages(args.plan)
    build_missing(required_stores(stages))
    return 0


def _print_stores(setup) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.token_store import describe, required_stores

    table = Table(title=f"token stores in {setup.plan.cache_dir}/tokens (built before the first stage that reads them)")
    rows = [describe(request) for request in required_stores(setup.stages)]
    for column in ("key", "kind", "inputs", "state"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)


def _print_stages(setup, launches) -> None:
    from rich.console import Console
    from rich.table import Table

    launch_of = {stage.index: n for n, group in enumerate(launches, 1) for stage in group}
    table = Table(title=f"plan '{setup.plan.name}' -> {setup.run.root}")
    for column in ("#", "stage", "kind", "launch", "ranks", "ZeRO", "precision", "optimizer", "steps", "batch (micro x accum x world)", "fast", "trains",
                   "lr groups", "load", "starts"):
        table.add_column(column)
    for st in setup.stages:
        s = st.settings
        table.add_row(f"{st.index:02d}", st.name, st.kind, str(launch_of.get(st.index, "-")), str(st.world_size), str(s.zero_stage), st.precision,
                      st.optimizer_type, str(st.steps), _batch(st), " ".join(st.fast.parts), *_trains(st),
                      setup.starts[st.index].mode, _start_of(setup, st))
    Console(width=240).print(table)
    for stage in setup.stages:
        print(f"stage {stage.index:02d} {stage.name}: load {setup.starts[stage.index].mode}: {setup.starts[stage.index].reason}")
        for note in stage.fast.notes:
            print(f"  fast: {note}")
        if stage.micro_batch_candidates:
            print(f"  micro_batch auto: the largest of {', '.join(map(str, stage.micro_batch_candidates))} that fits, probed at the stage's start")
        for group in stage.trainable.groups if stage.trainable else ():
            print(f"  lr group {group.label}: {group.params:,} params, lr {group.lr:.3g} (x{group.lr_scale:.3g})")
    for stage in setup.stages:
        resume = setup.resumes.get(stage.index)
        if resume is not None and (resume.mode != "fresh" or resume.set_aside):
            print(f"stage {stage.index:02d} {stage.name}: {resume.tag or 'from its start'} ({resume.mode}): {resume.reason}")
            for damaged in resume.set_aside:
                print(f"  damaged, set aside at launch: {damaged}")


def _batch(stage) -> str:
    """'16 = 4 x 2 x 2' (global = micro x accumulation x world); 'auto' for a probed micro batch."""
    if stage.micro_batch_candidates:
        return f"{stage.global_batch} = auto x auto x {stage.world_size}"
    return f"{stage.global_batch} = {stage.micro_batch} x {stage.grad_accum} x {stage.world_size}"


def _trains(stage) -> tuple[str, str]:
    """(trained parameters and share, lr groups: how many, lowest..highest peak lr) of a stage."""
    chosen = stage.trainable
    if chosen is None:
        return "all (100%)", f"1: {stage.settings.optimizer.lr:.3g}"
    lrs = sorted(g.lr for g in chosen.groups)
    span = f"{lrs[0]:.3g}" if lrs[0] == lrs[-1] else f"{lrs[0]:.3g}..{lrs[-1]:.3g}"
    return f"{chosen.trainable_params:,} ({chosen.share:.1%})", f"{len(lrs)}: {span}"


def _start_of(setup, stage) -> str:
    """'done', where a stage starts, or the checkpoint it resumes at (details under the table)."""
    resume = setup.resumes.get(stage.index)
    if resume is None:
        return "done"
    if resume.mode == "fresh":
        return "previous stage's handoff" if stage.index else "plan's model"
    return f"{resume.tag} ({resume.mode})"


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
    tokenize = sub.add_parser("tokenize", help=cmd_tokenize.__doc__)
    tokenize.add_argument("plan", help="plan YAML file")
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
    from harness.orchestrator import StageFailed

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
