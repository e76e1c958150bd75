"""The console tables: the stages `harness plan` resolved (with the decisions behind each), the
token stores they read, and where the stages of a run stand (`harness status`)."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from harness.objectives import OBJECTIVES
from harness.records import InvalidRecord, RunDir, SlurmJob, StartRecord, read_manifest
from harness.records.memory import gb
from harness.records.token_store import META, StoreMeta, StoreRequest
from harness.stages import Stage, expected_start_digest, required_stores, stage_stores
from harness.views.status import stage_statuses


def print_stages(setup, launches: list[list[Stage]]) -> None:
    """The stages of a RunSetup (harness/launch/setup.py) and, under the table, the reasons: load
    mode, fast path, micro batch, lr groups, resume point."""
    launch_of = {stage.index: n for n, group in enumerate(launches, 1) for stage in group}
    table = Table(title=f"plan '{setup.plan.name}' -> {setup.run.root}")
    for column in ("#", "stage", "kind", "launch", "ranks", "ZeRO", "precision", "optimizer", "steps", "batch (micro x accum x world)", "fast", "trains",
                   "lr groups", "memory/rank GB", "load", "starts"):
        table.add_column(column)
    for st in setup.stages:
        table.add_row(f"{st.index:02d}", st.name, st.kind, str(launch_of.get(st.index, "-")), str(st.world_size), str(st.zero_stage), st.precision,
                      st.optimizer_type, str(st.steps), _batch(st), " ".join(st.fast.parts), *_trains(st), _memory(st),
                      setup.starts[st.index].mode, _start_of(setup, st))
    Console(width=240).print(table)
    first = setup.stages[0]
    print(f"W&B: {first.wandb_mode} (wandb.mode {first.wandb.mode}); handoff weights: "
          + ", ".join(sorted({f'{stage.handoff_dtype}' for stage in setup.stages})) + " (handoff_dtype)")
    for stage in setup.stages:
        print(f"stage {stage.index:02d} {stage.name}: load {setup.starts[stage.index].mode}: {setup.starts[stage.index].reason}")
        if stage.embedding_resize:
            resize = stage.embedding_resize
            print(f"  embeddings: {resize.rows_before} -> {resize.rows_after} rows, one per token of the tokenizer (model.resize_embeddings; "
                  "new rows started as transformers' resize_token_embeddings(mean_resizing=True))")
        for note in stage.fast.notes:
            print(f"  fast: {note}")
        if stage.micro_batch_candidates:
            print(f"  micro_batch auto: the largest of {', '.join(map(str, stage.micro_batch_candidates))} that fits, probed at the stage's start "
                  f"(from {stage.micro_batch})")
        chosen = stage.trainable
        if chosen is not None and chosen.adapter is not None:
            print(f"  adapter {chosen.adapter.describe()}: {chosen.trainable_params:,} of {chosen.total_params:,} parameters train "
                  f"({chosen.share:.2%}); the base's {chosen.total_params - chosen.added_params:,} are frozen")
        for group in chosen.groups if chosen else ():
            print(f"  lr group {group.label}: {group.params:,} params, lr {group.lr:.3g} (x{group.lr_scale:.3g})")
        for note in _objective_notes(setup, stage) if stage.index in setup.resumes else ():
            print(f"  {note}")
        if stage.memory is not None:
            checked = f" of {stage.memory.rank_memory.source}" if stage.memory.rank_memory else " (the memory of a rank is unknown here: not checked)"
            print(f"  memory per rank{checked}: {stage.memory.estimate.breakdown()}")
            for decision in stage.memory.decisions:
                print(f"  {decision.field} auto -> {decision.value}: {decision.reason}")
    for stage in setup.stages:
        resume = setup.resumes.get(stage.index)
        if resume is not None and (resume.mode != "fresh" or resume.set_aside):
            print(f"stage {stage.index:02d} {stage.name}: {resume.tag or 'from its start'} ({resume.mode}): {resume.reason}")
            for damaged in resume.set_aside:
                print(f"  damaged, set aside at launch: {damaged}")


def _objective_notes(setup, stage: Stage) -> list[str]:
    """What the stage's objectives say about it (Objective.stage_notes: a preference stage's reference),
    given the digest of its start weights where the launch side knows it."""
    digest = _start_digest(setup, stage)
    return [note for kind, requests in stage_stores(stage).items() for request in requests
            for note in OBJECTIVES[kind].stage_notes(stage.settings, stage.precision, request.folder, digest, request.data)]


def _start_digest(setup, stage: Stage) -> str | None:
    """The digest of the weights an unfinished stage starts from: its own started.json when it
    resumes, else what the previous stage's manifest says it hands over (None: the first stage,
    a previous stage not done yet, or weights the worker rounds before digesting them)."""
    stage_dir = setup.run.stage(stage.index, stage.name)
    if setup.resumes[stage.index].mode != "fresh":
        try:
            return StartRecord.read(stage_dir.started).start_weights_digest
        except InvalidRecord:
            return None
    decision = setup.starts[stage.index]
    if decision.mode == "init" or stage.index - 1 in setup.resumes:
        return None
    before = setup.stages[stage.index - 1]
    return expected_start_digest(decision.mode, read_manifest(setup.run.stage(before.index, before.name), verify_files=False), stage.precision)


def _batch(stage: Stage) -> str:
    """'16 = 4 x 2 x 2' (global = micro x accumulation x world); 'auto' for a probed micro batch."""
    if stage.micro_batch_candidates:
        return f"{stage.global_batch} = auto x auto x {stage.world_size}"
    return f"{stage.global_batch} = {stage.micro_batch} x {stage.grad_accum} x {stage.world_size}"


def _memory(stage: Stage) -> str:
    """'0.52 of 12.64': the estimate per rank against what a rank has (harness/stages/memory.py, fit.py)."""
    if stage.memory is None:
        return "-"
    have = stage.memory.rank_memory
    return gb(stage.memory.estimate.total_bytes) + (f" of {gb(have.device_bytes)}" if have else "")


def _trains(stage: Stage) -> tuple[str, str]:
    """(trained parameters and share, lr groups: how many, lowest..highest peak lr) of a stage."""
    chosen = stage.trainable
    if chosen is None:
        return "all (100%)", f"1: {stage.settings.optimizer.lr:.3g}"
    lrs = sorted(g.lr for g in chosen.groups)
    span = f"{lrs[0]:.3g}" if lrs[0] == lrs[-1] else f"{lrs[0]:.3g}..{lrs[-1]:.3g}"
    adapter = f"{chosen.adapter.type} " if chosen.adapter else ""
    return f"{adapter}{chosen.trainable_params:,} ({chosen.share:.1%})", f"{len(lrs)}: {span}"


def _start_of(setup, stage: Stage) -> str:
    """'done', where a stage starts, or the checkpoint it resumes at (details under the table)."""
    resume = setup.resumes.get(stage.index)
    if resume is None:
        return "done"
    if resume.mode == "fresh":
        return "previous stage's handoff" if stage.index else "plan's model"
    return f"{resume.tag} ({resume.mode})"


def print_stores(stages: list[Stage], cache_dir: str) -> None:
    """The token stores the stages read: ready, or to be built before the first stage that reads them."""
    table = Table(title=f"token stores in {cache_dir}/tokens (built before the first stage that reads them)")
    for column in ("key", "kind", "inputs", "state"):
        table.add_column(column)
    for request in required_stores(stages):
        table.add_row(*describe_store(request).values())
    Console(width=200).print(table)


def describe_store(request: StoreRequest) -> dict[str, str]:
    """A row for `harness plan`: the store, its inputs, and whether it is ready or will be built."""
    spec = request.data
    inputs = f"hub {spec.hub} [{spec.split}]" if spec.hub else f"{len(spec.files)} file(s), {_mb(sum(os.stat(f).st_size for f in spec.files))}"
    if (request.folder / META).is_file():
        meta = StoreMeta.read(request.folder)
        mask = meta.tokens if OBJECTIVES[meta.kind].loss_mask else 0
        size = meta.tokens * (2 if meta.dtype == "uint16" else 4) + 8 * (meta.rows + 1) + mask
        state = f"ready: {meta.rows:,} rows, {meta.tokens:,} tokens, {_mb(size)}"
    elif spec.hub:
        state = "to build"
    else:  # bytes: a token a byte, 2 bytes each; subword tokenizers: about 4 bytes a token, 2-4 bytes each
        state = f"to build, about {_mb(sum(os.stat(f).st_size for f in spec.files) * (2 if request.tokenizer == 'bytes' else 1))}"
    return {"key": request.key, "kind": request.kind, "inputs": inputs, "state": state}


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def print_status(run: RunDir, jobs: dict[int, SlurmJob], slurm_states: dict[str, dict[str, str]]) -> None:
    """`harness status`: a row per stage folder; with the SLURM job of each and its state when submitted."""
    table = Table(title=str(run.root))
    columns = ["#", "stage", "state", "steps", "loss", "checkpoint", "load mode", "eta"] + (["slurm job", "slurm state"] if jobs else [])
    for column in columns:
        table.add_column(column)
    for s in stage_statuses(run):
        row = [f"{s.index:02d}", s.name, s.state, s.steps, "-" if s.loss is None else f"{s.loss:.4f}", s.checkpoint or "-", s.load_mode or "-",
               s.eta or "-"]
        if jobs:
            job = jobs.get(s.index)
            row += [job.job_id or "-", _slurm_state(slurm_states[job.job_id]) if job.job_id else "-"] if job else ["-", "-"]
        table.add_row(*row)
    Console(width=160).print(table)


def _slurm_state(state: dict[str, str]) -> str:
    text = state["JobState"]
    if state["Reason"] not in ("", "None"):
        text += f" ({state['Reason']})"
    if state["ExitCode"] not in ("", "0:0"):
        text += f", exit {state['ExitCode']}"
    if state["Restarts"] not in ("", "0"):
        text += f", requeued {state['Restarts']}x"
    return text
