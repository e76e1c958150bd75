"""Summaries and plots of finished (or partly finished) runs.

Reads only what the worker leaves in each stage folder (metrics.jsonl and
manifest.json, see layout.py) and never imports torch or DeepSpeed: it runs in
the orchestrator process. Plots are drawn on a bare matplotlib Figure, which
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

from harness.layout import RunDir, StageDir
from harness.records import InvalidRecord, read_json_lines, read_manifest

# "Final train loss" is the mean of this many last train/loss values of a
# stage: a single last value is too noisy to compare stages or runs.
FINAL_LOSS_WINDOW = 5


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
        """A manifest field (kind, optimizer, ...), else the first metric line's, else None."""
        source = self.manifest or (self.rows[0] if self.rows else {})
        return source.get(key)

    def step_range(self) -> tuple[int | None, int | None]:
        """First and last global step: from the manifest, else from the metrics."""
        if self.manifest is not None:
            # The manifest counts the steps before the stage (0 for the first stage).
            return self.manifest["global_step_start"] + 1, self.manifest["global_step_end"]
        steps = [r["global_step"] for r in self.rows]
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
    # Folders are named "<NN>-<stage>"; stage names may themselves contain "-".
    name = stage_dir.root.name.split("-", 1)[1]
    return StageRecord(
        name=name,
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


def report_table(run: RunRecord) -> list[dict]:
    """One row per stage: setup, step range, final train loss, eval results, load mode.

    Columns a stage that is not done cannot know (zero_stage, world_size, eval,
    load) are None; its kind, optimizer and steps then come from its metrics.
    """
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
            "zero_stage": manifest.get("zero_stage"),
            "world_size": manifest.get("world_size"),
            "step_start": start,
            "step_end": end,
            "train_loss": final_train_loss(stage),
            "eval_loss": evals.get("eval/loss"),
            "eval_ppl": evals.get("eval/ppl"),
            "exact_match": evals.get("eval/exact_match"),
            "load": (manifest.get("load") or {}).get("mode"),
        })
    return rows


def write_report(run_dir: str | Path, png_path: str | Path | None = None) -> Path:
    """Plot one run and write its table; return the PNG path.

    The PNG (default <out>/report.png) has train loss against global step,
    stage boundaries and labels, eval loss points on top, and a panel of
    each stage's eval results. <out>/report.json holds report_table's rows.
    """
    run, folder = load_run(run_dir), RunDir(Path(run_dir))
    rows = report_table(run)
    png = Path(png_path) if png_path else folder.report_png

    fig = Figure(figsize=(12, 9), layout="constrained")
    loss_ax, eval_ax = fig.subplots(2, 1, height_ratios=[3, 2])
    _plot_loss(loss_ax, run)
    _plot_evals(eval_ax, rows)
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


def _plot_evals(ax, rows: list[dict]) -> None:
    # Loss and exact match have different scales: loss on the left axis, exact match on the right.
    x = range(len(rows))
    losses = [r["eval_loss"] for r in rows]
    bars = ax.bar(x, [v if v is not None else 0 for v in losses], color="C0", alpha=0.7)
    ax.bar_label(bars, labels=[_eval_caption(r) for r in rows], fontsize=8)
    ax.set_ylabel("eval loss (bars)", color="C0")
    ax.set_xticks(list(x), [r["stage"] for r in rows], rotation=20, ha="right", fontsize=9)
    ax.margins(y=0.2)

    match = [(i, r["exact_match"]) for i, r in enumerate(rows) if r["exact_match"] is not None]
    if match:
        right = ax.twinx()
        right.plot(*zip(*match), "D", color="C3", markersize=7)
        right.set_ylim(0, 1.05)
        right.set_ylabel("exact match (diamonds)", color="C3")
    ax.set_title("eval results per stage")


def _eval_caption(row: dict) -> str:
    if row["status"] != "done":
        return "not done"
    if row["eval_loss"] is None:
        return "no eval"
    ppl = "" if row["eval_ppl"] is None else f"\nppl {row['eval_ppl']:.3g}"
    return f"{row['eval_loss']:.3g}{ppl}"


def compare_runs(run_dirs: list[str | Path], png_path: str | Path) -> Path:
    """Overlay the train loss of two or more runs; return the PNG path.

    Below the plot, a table of each run's final numbers: its last stage's eval
    results, the final train loss of its last stage with train losses, and its
    last global step. The same rows go to compare.json next to the PNG.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"compare_runs needs at least two run folders, got {len(run_dirs)}")
    runs = [load_run(d) for d in run_dirs]
    rows = [_final_row(run) for run in runs]
    png = Path(png_path)

    fig = Figure(figsize=(12, 7 + 0.3 * len(runs)), layout="constrained")
    ax, table_ax = fig.subplots(2, 1, height_ratios=[4, 1])
    for i, run in enumerate(runs):
        train = [p for stage in run.stages for p in stage.values("train/loss")]
        if train:
            ax.plot(*zip(*train), color=f"C{i % 10}", linewidth=1.2, label=run.name)
    ax.set_xlabel("global step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("train loss by run")

    table_ax.axis("off")
    columns = list(rows[0])
    table = table_ax.table(cellText=[[_cell(r[c]) for c in columns] for r in rows],
                           colLabels=columns, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)

    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    (png.parent / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    return png


def _final_row(run: RunRecord) -> dict:
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
        "exact_match": evals.get("eval/exact_match"),
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict], title: str, console: Console | None = None) -> None:
    """Print rows (as from report_table or compare.json) as a rich table."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in rows[0] if rows else []:
        # Two-line headers ("step\nstart") keep the many numeric columns narrow.
        table.add_column(column.replace("_", "\n"), no_wrap=True,
                         justify="left" if column in ("stage", "run") else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    (console or Console()).print(table)
