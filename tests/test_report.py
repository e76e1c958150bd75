import json
import math
import re

import matplotlib.image
import pytest
from rich.console import Console

from harness.plan import ModelSpec, OffloadSpec
from harness.records import EngineIdentity, LoadRecord, Manifest, RunDir
from harness.views.report import compare_runs, load_run, print_table, report_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (stage, phase, kind, optimizer, first global step, last global step, manifest eval or None if not done)
STAGES = [
    ("pretrain", "pretrain", "pretrain", "AdamW", 1, 40, {"eval/loss": 3.2, "eval/ppl": 24.5}),
    ("refine.c1.s2-adamw", "refine", "multistep", "AdamW", 41, 60,
     {"eval/loss": 2.1, "eval/ppl": 8.2, "eval/exact_match": 0.25}),
    ("refine.c1.s3-sgd", "refine", "multistep", "SGD", 61, 70, None),
]


def train_loss(step):
    return 5.0 - 0.05 * step


def make_run(root, offset=0.0):
    """A run folder with STAGES: a train line per step, an eval line every 10 steps."""
    run = RunDir(root)
    for index, (stage, phase, kind, optimizer, start, end, evals) in enumerate(STAGES):
        folder = run.stage(index, stage)
        folder.root.mkdir(parents=True)
        common = {"stage": stage, "phase": phase, "kind": kind}
        lines = []
        for step in range(start, end + 1):
            row = {**common, "optimizer": optimizer, "global_step": step, "stage_step": step - start + 1}
            lines.append({**row, "train/loss": train_loss(step) + offset, "train/lr": 1e-4})
            if step % 10 == 0:
                lines.append({**row, "eval/loss": train_loss(step) + 0.3})
        text = "".join(json.dumps(line) + "\n" for line in lines)
        if evals is None:
            text += '{"stage": "refine.c1.s3-sgd", "glo'  # killed mid-write
        else:
            Manifest(
                **common, index=index, engine_optimizer=optimizer,
                engine=EngineIdentity(optimizer=optimizer, zero_stage=2, world_size=4, dtype="fp32", offload=OffloadSpec(), model=ModelSpec(builtin="tiny-llama")),
                global_step_start=start - 1, global_step_end=end, stage_steps=end - start + 1, tokens_seen=0, samples_seen=0,
                data_position={}, eval=evals, load=LoadRecord(mode="init" if index == 0 else "weights_only", reason="test", source="test"),
                resumes=[], start_weights_digest="", start_optimizer_state_digest="", handoff_dtype="fp32", weights_digest="",
                optimizer_state_digest="", checkpoint_tag=f"step{end - start + 1}", files={}, finished=0.0, wandb_run_id=None,
                regularization={},
            ).write(folder.manifest)
        folder.metrics.write_text(text)
    return root


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 500 and height > 300


def test_load_run_reads_stages_in_order(tmp_path):
    run = load_run(make_run(tmp_path / "run-a"))
    assert run.name == "run-a"
    assert [s.name for s in run.stages] == [s[0] for s in STAGES]
    assert [s.done for s in run.stages] == [True, True, False]
    # 40 train + 4 eval lines; the truncated last line of the unfinished stage is skipped.
    assert len(run.stages[0].rows) == 44
    assert len(run.stages[2].rows) == 11


def test_report_table_values(tmp_path):
    rows = report_table(load_run(make_run(tmp_path / "run")))
    pretrain, refine, sgd = rows

    assert pretrain["stage"] == "pretrain" and pretrain["status"] == "done"
    assert (pretrain["kind"], pretrain["optimizer"], pretrain["load"]) == ("pretrain", "AdamW", "init")
    assert (pretrain["zero_stage"], pretrain["world_size"]) == (2, 4)
    assert (pretrain["step_start"], pretrain["step_end"]) == (1, 40)
    # mean of the losses at steps 36..40
    assert pretrain["train_loss"] == pytest.approx(5.0 - 0.05 * 38)
    assert (pretrain["eval_loss"], pretrain["eval_ppl"], pretrain["exact_match"]) == (3.2, 24.5, None)

    assert (refine["kind"], refine["optimizer"], refine["load"]) == ("multistep", "AdamW", "weights_only")
    assert (refine["step_start"], refine["step_end"]) == (41, 60)
    assert refine["train_loss"] == pytest.approx(5.0 - 0.05 * 58)
    assert (refine["eval_loss"], refine["eval_ppl"], refine["exact_match"]) == (2.1, 8.2, 0.25)

    # Not done: setup and steps come from its metrics, the rest is unknown.
    assert sgd["status"] == "not done"
    assert (sgd["kind"], sgd["optimizer"]) == ("multistep", "SGD")
    assert (sgd["step_start"], sgd["step_end"]) == (61, 70)
    assert sgd["train_loss"] == pytest.approx(5.0 - 0.05 * 68)
    assert sgd["zero_stage"] is sgd["eval_loss"] is sgd["load"] is None


def test_write_report_writes_png_and_table(tmp_path):
    root = make_run(tmp_path / "run")
    png = write_report(root)
    assert png == root / "report.png"
    assert_png(png)
    rows = json.loads((root / "report.json").read_text())
    assert rows == report_table(load_run(root))
    assert [(r["step_start"], r["step_end"]) for r in rows] == [(1, 40), (41, 60), (61, 70)]


def test_write_report_custom_path(tmp_path):
    root = make_run(tmp_path / "run")
    png = write_report(root, tmp_path / "plots" / "r.png")
    assert_png(png)
    assert (root / "report.json").is_file()


def test_compare_runs(tmp_path):
    a = make_run(tmp_path / "run-a")
    b = make_run(tmp_path / "run-b", offset=0.5)
    png = compare_runs([a, b], tmp_path / "cmp" / "compare.png")
    assert_png(png)
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["run"] for r in rows] == ["run-a", "run-b"]
    for row, offset in zip(rows, (0.0, 0.5)):
        assert row["stages_done"] == "2/3"
        assert row["last_stage"] == "refine.c1.s3-sgd"
        assert row["total_steps"] == 70
        assert row["train_loss"] == pytest.approx(5.0 - 0.05 * 68 + offset)
        assert row["eval_loss"] is None  # the last stage is not done


def test_compare_needs_two_runs(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        compare_runs([make_run(tmp_path / "run")], tmp_path / "c.png")


def test_missing_run_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_run(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        write_report(missing)


def test_empty_run_dir(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_run(tmp_path)


def test_print_table(tmp_path):
    rows = report_table(load_run(make_run(tmp_path / "run")))
    console = Console(record=True, width=200)
    print_table(rows, "my run", console=console)
    text = console.export_text()
    assert "my run" in text and "refine.c1.s3-sgd" in text and "not done" in text
    assert f"{5.0 - 0.05 * 38:.4g}" in text


def test_nan_loss_is_kept(tmp_path):
    # A diverged stage must show up as nan, not crash the report.
    root = make_run(tmp_path / "run")
    metrics = RunDir(root).stage_dirs()[0].metrics
    metrics.write_text(metrics.read_text() + json.dumps(
        {"stage": "pretrain", "global_step": 40, "train/loss": float("nan")}) + "\n")
    assert math.isnan(report_table(load_run(root))[0]["train_loss"])
    assert_png(write_report(root))
