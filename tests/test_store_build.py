"""Token stores built in pieces: byte for byte the store one process reading everything in one go
builds; finished pieces outlive a killed build; parts built apart (one per node or SLURM array
task) join into the same store."""
from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA, PRETRAIN_TEXT, make_plan, pretrain_phase, write_plan
from harness.cli import main
from harness.jobs.store_builder import build
from harness.jobs.store_pieces import plan_pieces
from harness.plan import DataSpec
from harness.records.token_store import META, PIECE_PLAN, PiecePlan, StoreMeta
from harness.stages.stores import store_request

BIG = 1 << 40  # a piece size no test input reaches: the whole input in one piece, read in one go
# The stores of plans/data as the builder wrote them before pieces existed (one process, every file
# read with Hugging Face datasets), sha256 of each file (first 16 hex digits).
BEFORE_PIECES = {
    "pretrain.txt": ("pretrain", {}, {"offsets.bin": "b961b062b2e5ba7d", "tokens.bin": "af5b25b2d9bbaf9c"}),
    "finetune.jsonl": ("finetune", {}, {"loss_mask.bin": "4d51201fd43fb076", "offsets.bin": "a2b0b4f64a91c64e", "tokens.bin": "2bb246dddac41b37"}),
    "chat.jsonl": ("finetune", {"rows": "chat"}, {"loss_mask.bin": "b8e634c7cc0d901a", "offsets.bin": "b8006aef1720f587",
                                                  "tokens.bin": "e5ab6a0eb1bf4e93"}),
}


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.glob("*.bin"))}


def built(kind: str, spec: DataSpec, cache: Path, **options) -> Path:
    request = store_request(kind, spec, "bytes", str(cache), "data")
    build(request, **options)
    return request.folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Inputs with every kind of cut: text with CRLF, lone CR and runs of blank lines of odd and
    even length, JSON Lines (plain and gzip), parquet in many row groups."""
    folder = tmp_path_factory.mktemp("corpora")
    paragraphs = [" ".join(f"w{(i * 7 + k) % 997}" for k in range(1 + i % 60)) for i in range(6000)]
    separators = [b"\n\n", b"\r\n\r\n", b"\n\n\n", b"\r\r\n", b"\n\n\n\n\n", b"\n", b"\r\n\n"]
    (folder / "odd.txt").write_bytes(b"".join(p.encode() + separators[i % 7] for i, p in enumerate(paragraphs)))
    lines = "".join(json.dumps({"text": p, "n": i}) + "\n" for i, p in enumerate(paragraphs))
    (folder / "rows.jsonl").write_text(lines)
    with gzip.open(folder / "rows.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"text": paragraphs}), folder / "rows.parquet", row_group_size=500)
    return folder


@pytest.mark.parametrize("files", [["odd.txt"], ["rows.jsonl", "rows.jsonl.gz"], ["rows.parquet"]])
def test_pieces_built_by_workers_join_into_the_store_one_process_builds_in_one_go(corpora, tmp_path, files):
    spec = DataSpec(files=[str(corpora / f) for f in files])
    whole = built("pretrain", spec, tmp_path / "whole", piece_bytes=BIG, workers=1)
    pieces = built("pretrain", spec, tmp_path / "pieces", piece_bytes=30_000, workers=2)
    meta = StoreMeta.read(pieces)
    assert meta.pieces > 5 and StoreMeta.read(whole).pieces == len(files)
    assert digests(pieces) == digests(whole) and meta.rows == StoreMeta.read(whole).rows > 5000


def test_stores_are_the_bytes_the_builder_wrote_before_pieces(tmp_path):
    for name, (kind, fields, before) in BEFORE_PIECES.items():
        folder = built(kind, DataSpec(files=[str(DATA / name)], **fields), tmp_path, piece_bytes=3_000)
        assert StoreMeta.read(folder).pieces > 1, name
        assert digests(folder) == before, name


def _builder(request, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.jobs.store_builder", request.model_dump_json(), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_a_killed_build_keeps_its_finished_pieces_and_the_next_build_redoes_only_the_rest(tmp_path):
    text = tmp_path / "big.txt"
    paragraph = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n").encode()
    text.write_bytes(paragraph * (16 * (1 << 20) // len(paragraph)))
    request = store_request("pretrain", DataSpec(files=[str(text)]), "bytes", str(tmp_path / "cache"), "data")
    killed = _builder(request, "--workers", "2")
    finished, workers = [], []
    while killed.poll() is None and len(finished) < 3:
        workers = workers or _children(killed.pid)
        finished = [p for p in request.pieces_folder.glob("[0-9]*") if "partial" not in p.name and not p.name.endswith(".lock")]
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(finished) >= 3 and not (request.folder / META).exists(), "killed mid-build"
    deadline = time.time() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert workers and not any(Path(f"/proc/{w}").exists() for w in workers), "the workers died with the builder"
    kept = {p.name: (p / "tokens.bin").stat().st_mtime_ns for p in request.pieces_folder.iterdir() if p.is_dir() and "partial" not in p.name}

    rebuilt = _builder(request, "--workers", "2")
    output = rebuilt.communicate(timeout=300)[0]
    assert rebuilt.returncode == 0, output
    meta = StoreMeta.read(request.folder)
    assert meta.pieces_reused == len(kept) >= 3 and meta.pieces == 16, "the next build reused every finished piece and built the rest"
    assert f"({meta.pieces} pieces, {len(kept)} reused)" in output
    assert "MB/s" in output and "tokenizing pretrain" in output, "one progress bar with its rate"
    assert not request.pieces_folder.exists() and not list(request.folder.parent.glob("*.partial-*")), "no piece or partial folder left"
    assert digests(request.folder) == digests(built("pretrain", DataSpec(files=[str(text)]), tmp_path / "one-go", piece_bytes=BIG, workers=1))


def test_parts_built_one_after_the_other_join_into_the_whole_store(tmp_path, capsys):
    plan = make_plan("parts", [pretrain_phase("pre", steps=2)], port=30300, cache_dir=str(tmp_path / "cache"))
    plan_path = write_plan(tmp_path, plan)
    request = store_request("pretrain", DataSpec(files=[str(PRETRAIN_TEXT)]), "bytes", str(tmp_path / "cache"), "phases[0].data")
    # The first builder records the cut and every part follows it: cut small here, so that each part has pieces.
    request.pieces_folder.mkdir(parents=True)
    (request.pieces_folder / PIECE_PLAN).write_text(PiecePlan(pieces=plan_pieces(request.data, 50_000)).model_dump_json())
    second_part = PiecePlan.model_validate_json((request.pieces_folder / PIECE_PLAN).read_text()).part(2, 2)

    assert main(["tokenize", str(plan_path), "--part", "2/2"]) == 0
    assert not (request.folder / META).exists() and "part 2/2" in capsys.readouterr().out, "half the pieces: not joined yet"
    assert main(["tokenize", str(plan_path), "--part", "1/2"]) == 0
    meta = StoreMeta.read(request.folder)
    assert meta.pieces == 10 and meta.pieces_reused == len(second_part) == 5, "part 1 built its half and joined both"
    assert digests(request.folder) == BEFORE_PIECES["pretrain.txt"][2]


def test_submit_renders_the_tokenize_job_array_before_the_stages(tmp_path, capsys):
    plan = make_plan("array", [pretrain_phase("pre", steps=2)], port=30310, cache_dir=str(tmp_path / "cache"))
    plan["cluster"]["launcher"] = "slurm"
    out = tmp_path / "run"
    assert main(["submit", str(write_plan(tmp_path, plan)), "--out", str(out), "--dry-run", "--tokenize-parts", "4"]) == 0
    rendered = capsys.readouterr().out
    assert rendered.index("tokenize.sbatch") < rendered.index("00-pre.sbatch"), "the array comes first: the stages wait for it"
    script = (out / "slurm" / "tokenize.sbatch").read_text()
    assert "#SBATCH --array=1-4" in script and '--part "$SLURM_ARRAY_TASK_ID/4"' in script and "harness.cli tokenize" in script
    assert "--gpus" not in script
