"""Every record that crosses a process boundary, as a typed model, and how it is written and read.

The launch side writes stage.json; the ranks write their rank records, checkpoint markers,
started.json and manifest.json; status, report, SLURM and the next stage read them back.
Writes are atomic (tmp file, fsync, rename): a reader sees the old file or the whole new one.
A file that does not parse into its model is reported with its path, never half-used.
File names come from layout.py. No torch here: the launch side reads these too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.layout import StageDir
from harness.plan import ModelSpec, OffloadSpec
from harness.stages import Stage

MANIFEST_FORMAT = 3  # 3: weight and optimizer-state digests are xxh3-128 (2: sha256)


class InvalidRecord(Exception):
    """A record file that is missing, unparseable, or whose listed files do not match."""


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write text so that readers see the old file or the whole new one, never a part. The file
    is created with `mode` (0o600: never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its own mode: start afresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """Base of every record: unknown keys are errors (a record from another version is not guessed at)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def write(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2, by_alias=True) + "\n")

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """The record in `path`; raises InvalidRecord naming the file and what is wrong."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise InvalidRecord(f"{path} does not exist") from None
        except OSError as error:
            raise InvalidRecord(f"{path} cannot be read: {error}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<file>"
            raise InvalidRecord(f"{path} is not a valid {cls.__name__} ({where}: {first['msg']})") from None


# ---- file integrity ----------------------------------------------------------------------

class FileCheck(Record):
    """Size and xxh3-128 of one file: fast enough to check multi-GB checkpoints on every resume."""

    bytes: int
    xxh3: str


def file_check(path: Path) -> FileCheck:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return FileCheck(bytes=path.stat().st_size, xxh3=digest.hexdigest())


def folder_checks(folder: Path, root: Path, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, FileCheck]:
    """Every file under `folder` (whose name is `wanted`), by its path relative to `root`."""
    return {str(p.relative_to(root)): file_check(p) for p in sorted(folder.rglob("*")) if p.is_file() and wanted(p.name)}


def damaged_files(files: dict[str, FileCheck], root: Path) -> list[str]:
    """'<file>: why' for each listed file that is missing or differs; sizes first (cheap)."""
    problems = []
    for rel, expected in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, {expected.bytes} were written")
    for rel, expected in files.items():
        path = root / rel
        if path.is_file() and path.stat().st_size == expected.bytes and file_check(path).xxh3 != expected.xxh3:
            problems.append(f"{path}: content differs from what was written (checksum)")
    return problems


# ---- records -----------------------------------------------------------------------------

class Progress(Record):
    """How far a stage got: in every checkpoint marker and in the manifest."""

    global_step_start: int = 0
    stage_step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    data_position: dict[str, int] = {}
    """Samples consumed per data stream (dataset_key), carried from stage to stage."""

    @property
    def global_step(self) -> int:
        return self.global_step_start + self.stage_step


class EngineSettings(Record):
    """What decides whether a DeepSpeed checkpoint loads natively into an engine."""

    zero_stage: int
    world_size: int
    dtype: str
    optimizer: str
    offload: OffloadSpec
    model: ModelSpec
    trainable: str = "all"
    """The trainable layout (which parameters train, in which lr groups): 'all', or its digest."""


def engine_settings(stage: Stage) -> EngineSettings:
    s = stage.settings
    return EngineSettings(zero_stage=s.zero_stage, world_size=stage.world_size, dtype=stage.precision, optimizer=stage.optimizer_type,
                          offload=s.offload, model=stage.model, trainable=stage.trainable.layout() if stage.trainable else "all")


class CheckpointRecord(Record):
    """checkpoints/step<N>/complete: written by rank 0 once every rank saved its part. The tag
    counts only while every file it lists is there, whole and unchanged."""

    format: Literal[3] = MANIFEST_FORMAT
    """The harness version that wrote it (a tag of another format is not resumed: older_format)."""
    progress: Progress
    engine: EngineSettings
    files: dict[str, FileCheck]
    """Every file of the tag, relative to the tag's folder."""


class ResumePoint(Record):
    """How a stage with checkpoints of its own continues (decided on the launch side, see resume.py)."""

    mode: Literal["fresh", "native", "universal", "consolidated"]
    """fresh: no intact checkpoint, start from the handoff; native: DeepSpeed loads the tag as
    saved; universal: a universal checkpoint made from it (another world size, moments kept);
    consolidated: its fp32 weights, fresh optimizer (step, scheduler and data position kept)."""
    reason: str
    tag: str | None = None
    load_folder: str | None = None
    """universal: the converted checkpoint folder; consolidated: the Hugging Face weights folder."""
    progress: Progress | None = None
    set_aside: list[str] = []
    """Damaged tags moved to checkpoints/damaged/ before the launch (nothing is deleted)."""


class HandoffSide(Record):
    """What decides whether optimizer moments pass from one stage to the next (harness/load_mode.py)."""

    optimizer: str
    zero_stage: int
    world_size: int
    dtype: str
    offload: OffloadSpec
    trained: str
    """Which parameters train (TrainableSet.trained): 'all', or a digest of their names."""
    trainable: str
    """The trainable layout (TrainableSet.layout): 'all', or a digest of which parameters train in which groups."""
    trainable_params: int | None
    """Trained elements; None: every parameter."""


class StartDecision(Record):
    """How a stage takes over from the previous one, decided on the launch side (load_mode.py)."""

    mode: Literal["init", "full_state", "weights_only"]
    """init: the plan's model; full_state: the previous DeepSpeed checkpoint, optimizer moments
    included; weights_only: the previous Hugging Face model, fresh optimizer."""
    reason: str
    previous: HandoffSide | None = None
    """The previous stage as the decision saw it: the worker checks that its manifest says the same."""


class StageFile(Record):
    """stage.json: everything a rank needs to run its stage."""

    stage: Stage
    previous: str | None
    """The previous stage's folder (its manifest and handoff), None for the first stage."""
    run_dir: str
    start: StartDecision
    resume: ResumePoint = ResumePoint(mode="fresh", reason="no checkpoint of its own")


class LoadRecord(Record):
    """How the stage's start weights were loaded (the handoff from the previous stage)."""

    mode: str
    reason: str
    source: str = Field(alias="from")


class ResumeRecord(Record):
    """One resume of an interrupted stage, as carried out."""

    mode: str
    reason: str
    tag: str
    stage_step: int
    weights_digest: str
    """Digest of the fp32 weights right after the load."""
    optimizer_state_carried: bool
    """The optimizer holds loaded state (moments) rather than starting fresh."""
    world_size: int
    time: float


class StartRecord(Record):
    """started.json: written when the stage first starts; each resume appends to it."""

    load: LoadRecord
    start_weights_digest: str
    start_optimizer_state_digest: str
    time: float
    resumes: list[ResumeRecord] = []


class RankRecord(Record):
    """ranks/rank<N>.json: where a rank runs, so the launch side ends exactly these processes."""

    rank: int
    node_rank: int
    host: str
    address: str | None
    slurm_node: str | None
    pid: int
    launcher_pid: int
    time: float


class MemoryRecord(Record):
    """ranks/memory-rank<N>.json: the rank's peak and current RSS at its last milestone, and at each."""

    rank: int
    host: str
    pid: int
    milestone: str
    time: float
    peak_rss_bytes: int
    rss_bytes: int
    host_memory_bytes: int | None
    milestones: dict[str, dict[str, Any]]


class GroupRecord(Record):
    """One optimizer parameter group as it trained."""

    label: str
    lr_scale: float
    lr: float
    """Peak lr: the optimizer's lr x lr_scale (the schedule scales it)."""
    params: int


class TrainableRecord(Record):
    """What a stage trained: its selectors, how many elements in which lr groups, and the digest of
    its frozen weights at the start and at the end (the worker checks they are equal)."""

    train: list[str]
    freeze: list[str]
    lr_scale: dict[str, float]
    layer_decay: float
    trainable_params: int
    total_params: int
    share: float
    trained: str
    layout: str
    """TrainableSet.trained and .layout: what the next stage compares to carry optimizer moments."""
    groups: list[GroupRecord]
    frozen_digest_start: str
    frozen_digest_end: str
    """Digest of the frozen parameters ('none' when nothing is frozen), gathered from the engine."""


def trainable_record(stage: Stage, total_params: int, frozen_digests: tuple[str, str]) -> TrainableRecord:
    """The manifest's trainable record of a stage (total_params: the model's, counted on the engine)."""
    spec, chosen = stage.settings.trainable, stage.trainable
    if chosen is None:
        groups = [GroupRecord(label="all", lr_scale=1.0, lr=stage.settings.optimizer.lr, params=total_params)]
        counts = {"trainable_params": total_params, "share": 1.0, "trained": "all", "layout": "all"}
    else:
        groups = [GroupRecord(label=g.label, lr_scale=g.lr_scale, lr=g.lr, params=g.params) for g in chosen.groups]
        counts = {"trainable_params": chosen.trainable_params, "share": chosen.share, "trained": chosen.trained(), "layout": chosen.layout()}
    return TrainableRecord(train=spec.train, freeze=spec.freeze, lr_scale=spec.lr_scale, layer_decay=spec.layer_decay, total_params=total_params,
                           groups=groups, frozen_digest_start=frozen_digests[0], frozen_digest_end=frozen_digests[1], **counts)


class FastRecord(Record):
    """The fast path as it ran on rank 0 (harness/worker/fast.py), in the manifest."""

    compile: Literal["off", "engine", "deepcompile"]
    liger: bool
    attention: str
    fallbacks: dict[str, str] = {}
    """Part -> why it was turned off as the stage started (each also a warning line on the console)."""
    notes: list[str] = []
    """Parts the launch side turned off for this stage, with the reason (harness/fast.py)."""
    first_compiled_forward_s: float | None = None
    """Seconds of the first compiled forward (tracing and compiling it; the backward compiles in the
    first backward, so the first step's time in metrics.jsonl is the whole cost); None when not compiled."""


class ProbeTry(Record):
    """One micro batch the probe ran: a forward, backward and optimizer step on every rank."""

    micro_batch: int
    peak_bytes: int | None
    """The highest peak over the ranks (GPU memory allocated, or host RSS); None: it ran out of memory."""
    fits: bool


class BatchRecord(Record):
    """micro_batch.json: how a stage splits its global batch, and how that was chosen. Written by
    rank 0 after a micro_batch auto probe; a resume of the stage reads it instead of probing again."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    world_size: int
    chosen_by: Literal["plan", "probe", "recorded"]
    memory: Literal["gpu", "host"] | None = None
    """What the probe measured: GPU memory on CUDA, the rank's host memory (RSS) on CPU."""
    budget_bytes: int | None = None
    """The most a micro batch may peak at on a rank: 90% of the GPU memory free to this process, or
    of this rank's share of the node's available host memory."""
    probe: list[ProbeTry] = []
    probe_seconds: float | None = None


class Manifest(Record):
    """manifest.json: written last and atomically by rank 0; the stage is done while it is valid."""

    format: Literal[3] = MANIFEST_FORMAT
    stage: str
    index: int
    phase: str
    kind: str
    zero_stage: int
    world_size: int
    dtype: str
    offload: OffloadSpec
    optimizer: str
    engine_optimizer: str
    global_step_start: int
    global_step_end: int
    stage_steps: int
    tokens_seen: int
    samples_seen: int
    data_position: dict[str, int]
    eval: dict[str, float]
    load: LoadRecord
    resumes: list[ResumeRecord]
    start_weights_digest: str
    start_optimizer_state_digest: str
    handoff_dtype: str
    weights_digest: str
    """fp32 master weights at the end."""
    handoff_weights_digest: str | None = None
    """The weights as the handoff files hold them, when their dtype is not fp32."""
    optimizer_state_digest: str
    checkpoint_tag: str
    files: dict[str, FileCheck]
    """The handoff's files, relative to the stage folder."""
    finished: float
    wandb_run_id: str | None
    regularization: dict[str, Any]
    trainable: TrainableRecord | None = None
    """None: a manifest written without one (every parameter trained, one group)."""
    fast: FastRecord | None = None
    """The fast path as it ran (None: a manifest written without one)."""
    batch: BatchRecord | None = None
    """The micro batch and accumulation steps the stage trained with (None: written without one)."""


class SlurmJob(Record):
    """One rendered (and maybe submitted) batch job, in slurm/jobs.json."""

    name: str
    script: str
    stages: list[int]
    job_id: str | None = None


class SlurmJobs(Record):
    jobs: list[SlurmJob]


# ---- reading with checks -----------------------------------------------------------------

def read_manifest(stage_dir: StageDir, verify_files: bool = True) -> Manifest:
    """The stage's manifest, and (verify_files) every file it lists present and unchanged."""
    manifest = Manifest.read(stage_dir.manifest)
    if verify_files:
        damaged = damaged_files(manifest.files, stage_dir.root)
        if damaged:
            raise InvalidRecord(f"{stage_dir.manifest} lists damaged files: {'; '.join(damaged)}")
    return manifest


def is_done(stage_dir: StageDir) -> bool:
    """The one rule for 'done' (run, status, report, SLURM): a valid manifest whose files are intact."""
    try:
        read_manifest(stage_dir)
    except InvalidRecord:
        return False
    return True


def older_format(stage_dir: StageDir) -> str | None:
    """The file of a stage folder that an older harness wrote (a manifest of another format, or a
    checkpoint marker that holds only progress), if any: its stage must not be rerun over it."""
    try:
        manifest = json.loads(stage_dir.manifest.read_text())
        if isinstance(manifest, dict) and manifest.get("format") not in (None, MANIFEST_FORMAT):
            return f"{stage_dir.manifest} (format {manifest.get('format')})"
    except (OSError, ValueError):
        pass
    for marker in stage_dir.checkpoints.glob("step*/complete"):
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "stage_step" in record and "engine" not in record:
            return f"{marker} (progress only)"
        if isinstance(record, dict) and record.get("format") != MANIFEST_FORMAT:
            return f"{marker} (format {record.get('format', 2)})"
    return None


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line cut by a crash is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
