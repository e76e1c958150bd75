"""manifest.json: what a finished stage hands over, written last and atomically by rank 0; the
stage is done while it is valid and every file it lists is intact. Also the records it embeds:
what trained (TrainableRecord), how fast (FastRecord), in which batch layout (BatchRecord)."""
from __future__ import annotations

import json
from typing import Any, Literal

from harness.records.checkpoints import MANIFEST_FORMAT, SAMPLE_ORDER_CHANGE, LoadRecord, ResumeRecord
from harness.records.engine import Adapter, EngineIdentity
from harness.records.files import FileCheck, InvalidRecord, Record, damaged_files
from harness.records.layout import StageDir
from harness.records.memory import MemoryPlan

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
    adapter: Adapter | None = None
    """The adapter trained on the frozen base (its matrices and copies are the trained parameters)."""



class FastRecord(Record):
    """The fast path as it ran on rank 0 (harness/worker/fast.py), in the manifest."""

    compile: Literal["off", "engine", "deepcompile"]
    liger: bool
    attention: str
    activation_checkpointing: str = "off"
    """Decoder layers recomputed in the backward as the stage ran: off, full, or 'selective (every k)'."""
    fallbacks: dict[str, str] = {}
    """Part -> why it was turned off as the stage started (each also a warning line on the console)."""
    notes: list[str] = []
    """Parts the launch side turned off for this stage, with the reason (harness/stages/fast.py)."""
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


class EmbeddingResize(Record):
    """Embedding rows the first stage adds for a tokenizer longer than the model's embeddings
    (model.resize_embeddings): decided on the launch side (stage.json), recorded in the manifest."""

    rows_before: int
    rows_after: int
    init: Literal["mean"] = "mean"
    """How the new rows start: as transformers' resize_token_embeddings(mean_resizing=True) makes
    them, drawn from a normal around the old rows' mean with their covariance."""


class SourceDraw(Record):
    """What one source of a weighted mixture gave a stage (manifest data_mix)."""

    inputs: list[str]
    quota: int
    """Its samples in every cycle of the mixture (harness/stages/mixture.py)."""
    samples: int
    tokens: int
    """Tokens of the samples drawn in this stage (rows as cut to seq_len)."""
    epochs: float
    """Epochs of the source drawn in all by the stage's end: over 1, it was repeated (up-sampled)."""


class ReferenceRecord(Record):
    """A preference stage's reference log-probabilities (dpo, ipo): where they are, and whether this
    attempt of the stage computed them from its start weights or read them (harness/worker/objectives/preference.py)."""

    file: str
    """The .npy beside the token store (records.token_store.reference_file)."""
    pairs: int
    reused: bool
    """Read from the file (computed by an earlier attempt, or another stage with the same data and start)."""
    seconds: float
    """The time it took: the ranks' forwards over every pair, or reading the file."""


class Manifest(Record):
    """manifest.json: written last and atomically by rank 0; the stage is done while it is valid."""

    format: Literal[5] = MANIFEST_FORMAT
    stage: str
    index: int
    phase: str
    kind: str
    engine: EngineIdentity
    """The engine the stage trained with (the next stage's load mode reads it)."""
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
    embedding_resize: EmbeddingResize | None = None
    """Embedding rows this stage added before training (None: none)."""
    memory: MemoryPlan | None = None
    """The memory the launch side planned: the per-rank estimate, the memory of a rank, and each
    `auto` setting's choice with its reason (None: no estimate, or written without one)."""
    reference: ReferenceRecord | None = None
    """A dpo or ipo stage's reference log-probabilities (None: other stages)."""
    data_mix: dict[str, list[SourceDraw]] = {}
    """Per data set that is a weighted mixture (by objective kind): what each source gave, in source order."""



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
    checkpoint marker that holds only progress), with why it matters, if any: its stage must not be
    rerun over it, nor its data position continued."""
    try:
        manifest = json.loads(stage_dir.manifest.read_text())
        if isinstance(manifest, dict) and manifest.get("format") not in (None, MANIFEST_FORMAT):
            return f"{stage_dir.manifest} (format {manifest.get('format')}{_why(manifest.get('format'))})"
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
            return f"{marker} (format {record.get('format', 2)}{_why(record.get('format', 2))})"
    return None


def _why(found_format) -> str:
    return f": {SAMPLE_ORDER_CHANGE}" if found_format == 4 else ""
