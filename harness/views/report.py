"""Summaries and plots of finished (or partly finished) runs.

Reads only what the worker leaves in each stage folder (metrics.jsonl and
manifest.json, see harness/records/layout.py) and never imports torch or DeepSpeed:
it runs in the launch-side process. Plots are drawn on a bare matplotlib Figure, which
renders with the Agg canvas and leaves pyplot's global state alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory
from rich import box
from rich.console import Console
from rich.table import Table

from harness.objectives.task_metrics import METRIC_NAMES, metric_keys
from harness.records import InvalidRecord, RunDir, StageDir, read_json_lines, read_manifest

# "Final train loss" is the mean of this many last train/loss values of a
# stage: a single last value is too noisy to compare stages or runs.
FINAL_LOSS_WINDOW = 5
# Eval metrics besides the loss, in the order tables and plots show them: the task metrics
# (eval/exact_match ...; see task_metrics.py), then a preference stage's held-out reward accuracy
# and margin (eval/rewards/accuracies, eval/rewards/margins; see objectives/preference.py).
METRIC_KEYS = metric_keys(list(METRIC_NAMES)) + ["eval/rewards/accuracies", "eval/rewards/margins"]


@dataclass
class StageRecord:
    """One stage folder: its manifest (None while not done) and metric lines."""

    name: str
    folder: Path
    manifest: dict | None
    rows: list[dict]

    @property
    def done(self) -> bool:
        return self.manifest is not None

    def values(self, key: str) -> list[tuple[int, float]]:
        """(global_step, value) of every metric line that has `key`."""
        return [(r["global_step"], r[key]) for r in self.rows if key in r]

    def setup(self, key: str):
        """A manifest field (kind, optimizer, zero_stage, ...: its engine's too), else the first
        metric line's, else None."""
        if self.manifest is not None:
            return {**self.manifest, **self.manifest["engine"]}.get(key)
        return (self.rows[0] if self.rows else {}).get(key)

    def step_range(self) -> tuple[int | None, int | None]:
        """First and last global step: from the manifest, else from the metrics."""
        if self.manifest is not None:
            # The manifest counts the steps before the stage (0 for the first stage).
            return self.manifest["global_step_start"] + 1, self.manifest["global_step_end"]
        steps = [r["global_step"] for r in self.rows if r.get("stage_step", 1) > 0]
        return (min(steps), max(steps)) if steps else (None, None)


@dataclass
class RunRecord:
    """One run folder and its stages, in run order."""

    name: str
    root: Path
    stages: list[StageRecord]


def load_run(run_dir: str | Path) -> RunRecord:
    """Read every stage folder of `run_dir`.

    Raises FileNotFoundError if the folder does not exist and ValueError if it
    holds no stage folders.
    """
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"run folder not found: {run.root}")
    stages = [_load_stage(sd) for sd in run.stage_dirs()]
    if not stages:
        raise ValueError(f"no stage folders in {run.phases} (is {run.root} a run folder?)")
    return RunRecord(name=run.root.resolve().name, root=run.root, stages=stages)


def _load_stage(stage_dir: StageDir) -> StageRecord:
    return StageRecord(
        name=stage_dir.name,
        folder=stage_dir.root,
        manifest=_read_manifest(stage_dir),
        rows=read_json_lines(stage_dir.metrics),
    )


def _read_manifest(stage_dir: StageDir) -> dict | None:
    """The manifest of a done stage (records.is_done: valid, files intact), else None."""
    try:
        return read_manifest(stage_dir).model_dump(by_alias=True)
    except InvalidRecord:
        return None


def final_train_loss(stage: StageRecord) -> float | None:
    """Mean of the last FINAL_LOSS_WINDOW train/loss values, None if none."""
    losses = [v for _, v in stage.values("train/loss")]
    return mean(losses[-FINAL_LOSS_WINDOW:]) if losses else None


def metric_columns(evals: list[dict]) -> list[str]:
    """The metric keys (eval/exact_match, eval/bleu, eval/rewards/accuracies, ...) that any of the eval dicts has."""
    return [key for key in METRIC_KEYS if any(key in e for e in evals)]


def _metric_values(evals: dict, keys: list[str]) -> dict:
    """{'exact_match': value or None, 'rewards/accuracies': ..., ...} for the columns keys."""
    return {key.removeprefix("eval/"): evals.get(key) for key in keys}


def start_eval(stage: StageRecord) -> dict:
    """The stage's evaluation before its first step (eval_on_start: the weights it started from),
    or {}."""
    return next((r for r in stage.rows if r.get("stage_step") == 0), {})


def report_table(run: RunRecord) -> list[dict]:
    """One row per stage: setup, step range, final train loss, eval loss and perplexity, each
    metric that some stage reports (exact_match, f1, bleu, chrf, rouge1/2/L, a preference stage's
    rewards/accuracies and rewards/margins; as start_<metric> too where some stage evaluated before
    its first step), load mode.

    Columns a stage that is not done cannot know (zero_stage, world_size, eval,
    load) are None; its kind, optimizer and steps then come from its metrics.
    """
    keys = metric_columns([(s.manifest or {}).get("eval") or {} for s in run.stages])
    start_keys = metric_columns([start_eval(s) for s in run.stages])
    rows = []
    for stage in run.stages:
        manifest = stage.manifest or {}
        evals = manifest.get("eval") or {}
        start, end = stage.step_range()
        rows.append({
            "stage": stage.name,
            "status": "done" if stage.done else "not done",
            "kind": stage.setup("kind"),
            "optimizer": stage.setup("optimizer"),
            "zero_stage": stage.setup("zero_stage"),
            "world_size": stage.setup("world_size"),
            "step_start": start,
            "step_end": end,
            "train_loss": final_train_loss(stage),
            "eval_loss": evals.get("eval/loss"),
            "eval_ppl": evals.get("eval/ppl"),
            **{f"start_{k}": v for k, v in _metric_values(start_eval(stage), start_keys).items()},
            **_metric_values(evals, keys),
            "load": (manifest.get("load") or {}).get("mode"),
        })
    return rows


def write_report(run_dir: str | Path, png_path: str | Path | None = None) -> Path:
    """Plot one run and write its table; return the PNG path.

    The PNG (default <out>/report.png) has train loss against global step, stage
    boundaries and labels, eval loss points on top, and below it one panel per eval
    metric (eval loss, each task metric, reward accuracy and margin): every evaluation of every stage against
    global step, so a metric's jump between stages shows (an eval before a stage's
    first step, `eval_on_start`, sits at the boundary). <out>/report.json holds
    report_table's rows.
    """
    run, folder = load_run(run_dir), RunDir(Path(run_dir))
    rows = report_table(run)
    png = Path(png_path) if png_path else folder.report_png
    keys = ["eval/loss"] + metric_columns([r for stage in run.stages for r in stage.rows])
    columns = min(len(keys), 3)
    panel_rows = -(-len(keys) // columns)

    fig = Figure(figsize=(12, 6 + 3 * panel_rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[6, 3 * panel_rows])
    _plot_loss(top.subplots(), run)
    for ax, key in zip(bottom.subplots(panel_rows, columns, squeeze=False).flat, keys):
        _plot_metric(ax, run, key)
    for ax in bottom.axes[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"run {run.name}")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    folder.report_json.write_text(json.dumps(rows, indent=2) + "\n")
    return png


def _plot_loss(ax, run: RunRecord) -> None:
    # x in data units, y in axes units: labels sit just above the plot, clear of the curves.
    label_at = blended_transform_factory(ax.transData, ax.transAxes)
    for i, stage in enumerate(run.stages):
        color = f"C{i % 10}"
        train = stage.values("train/loss")
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.2)
        start, _ = stage.step_range()
        if start is None:
            continue
        if i > 0:
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
        text = f"{stage.name} ({stage.setup('optimizer')})" + ("" if stage.done else " [not done]")
        # Slanted labels from each segment's start stay apart even for short stages.
        ax.text(start, 1.01, text, transform=label_at, rotation=40, rotation_mode="anchor",
                ha="left", va="bottom", fontsize=9, color=color)
    ax.set_xlabel("global step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    evals = [p for stage in run.stages for p in stage.values("eval/loss")]
    if evals:
        ax.plot(*zip(*evals), "o", color="black", markersize=5, label="eval loss")
        ax.legend(loc="upper right")


def _plot_metric(ax, run: RunRecord, key: str) -> None:
    """Every evaluation of `key` against global step, one color per stage (as in the loss plot),
    the last value of each stage written next to it."""
    for i, stage in enumerate(run.stages):
        points = stage.values(key)
        if not points:
            continue
        ax.plot(*zip(*points), "o-", color=f"C{i % 10}", markersize=4, linewidth=1)
        step, value = points[-1]
        ax.annotate(f"{value:.3g}", (step, value), textcoords="offset points", xytext=(3, 4), fontsize=8, color=f"C{i % 10}")
        start, _ = stage.step_range()
        if i > 0 and start is not None:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("global step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def compare_runs(run_dirs: list[str | Path], png_path: str | Path) -> Path:
    """Overlay the train loss of two or more runs; return the PNG path.

    Below the plot, one panel per eval metric (eval loss, each task metric, reward accuracy and
    margin): each run's
    final value per stage (from the manifests), one line per run. The table rows (each run's
    last stage's eval results and task metrics, the final train loss of its last stage with
    train losses, its last global step) go to compare.json next to the PNG.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"compare_runs needs at least two run folders, got {len(run_dirs)}")
    runs = [load_run(d) for d in run_dirs]
    keys = metric_columns([(s.manifest or {}).get("eval") or {} for run in runs for s in run.stages])
    rows = [_final_row(run, keys) for run in runs]
    png = Path(png_path)
    panels = ["eval/loss"] + keys
    columns = min(len(panels), 3)
    panel_rows = -(-len(panels) // columns)

    fig = Figure(figsize=(12, 6 + 3 * panel_rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[6, 3 * panel_rows])
    ax = top.subplots()
    for i, run in enumerate(runs):
        train = [p for stage in run.stages for p in stage.values("train/loss")]
        if train:
            ax.plot(*zip(*train), color=f"C{i % 10}", linewidth=1.2, label=run.name)
    ax.set_xlabel("global step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("train loss by run")
    for panel, key in zip(bottom.subplots(panel_rows, columns, squeeze=False).flat, panels):
        _plot_final_metric(panel, runs, key)
    for panel in bottom.axes[len(panels):]:
        panel.axis("off")

    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    (png.parent / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    return png


def _plot_final_metric(ax, runs: list[RunRecord], key: str) -> None:
    """Each run's final value of `key` per stage (stages in run order; the first run's names on the axis)."""
    for i, run in enumerate(runs):
        values = [((s.manifest or {}).get("eval") or {}).get(key) for s in run.stages]
        points = [(x, v) for x, v in enumerate(values) if v is not None]
        if points:
            ax.plot(*zip(*points), "o-", color=f"C{i % 10}", markersize=4, linewidth=1, label=run.name)
    names = [s.name for s in max(runs, key=lambda r: len(r.stages)).stages]
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_title(key, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(alpha=0.3)


def _final_row(run: RunRecord, keys: list[str]) -> dict:
    last = run.stages[-1]
    evals = (last.manifest or {}).get("eval") or {}
    losses = [final_train_loss(s) for s in run.stages]
    ends = [s.step_range()[1] for s in run.stages]
    return {
        "run": run.name,
        "stages_done": f"{sum(s.done for s in run.stages)}/{len(run.stages)}",
        "last_stage": last.name,
        "total_steps": max((e for e in ends if e is not None), default=None),
        "train_loss": next((v for v in reversed(losses) if v is not None), None),
        "eval_loss": evals.get("eval/loss"),
        "eval_ppl": evals.get("eval/ppl"),
        **_metric_values(evals, keys),
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict], title: str, console: Console | None = None) -> None:
    """Print rows (as from report_table or compare.json) as rich tables that fit the console's
    width (80 columns in a pipe): the columns are split over as many tables as needed, each
    starting with the first column (stage or run), so no cell is ever cut to "…"."""
    console = console or Console()
    columns = list(rows[0]) if rows else []
    groups: list[list[str]] = []
    for column in columns[1:] or columns:
        if groups and _width(console, _table(rows, None, [columns[0], *groups[-1], column])) <= console.width:
            groups[-1].append(column)
        else:
            groups.append([column])
    for k, group in enumerate(groups):
        keys = group if group == columns[:1] else [columns[0], *group]
        console.print(_table(rows, title if k == 0 else None, keys))


def _width(console: Console, table: Table) -> int:
    """Columns the table needs unwrapped (rich's own measure stops at the console's width)."""
    return console.measure(table, options=console.options.update_width(10_000)).maximum


def _table(rows: list[dict], title: str | None, columns: list[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in columns:
        # Two-line headers ("step\nstart") keep the many numeric columns narrow.
        table.add_column(column.replace("_", "\n"), no_wrap=True,
                         justify="left" if column in ("stage", "run") else "right")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    return table
