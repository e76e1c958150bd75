"""Records of a stage's start and of its checkpoints: how far it got (Progress), each complete
checkpoint tag (CheckpointRecord), how it starts from the previous stage (StartDecision) or
resumes from its own checkpoint (ResumePoint), both decided on the launch side, and what the
ranks then did (started.json: StartRecord)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.records.engine import EngineIdentity
from harness.records.files import FileCheck, Record

MANIFEST_FORMAT = 5
"""The format of manifests and checkpoint markers. 5: data positions index the sample order computed
per position (harness/worker/order.py); 4: one EngineIdentity replaces the flat engine fields and
the separate handoff/resume settings (3: digests are xxh3-128; 2: sha256)."""
SAMPLE_ORDER_CHANGE = (
    "its data positions count samples in the stored permutations of format 4; this harness computes the "
    "order per position, so the same position holds other samples and another held-out split: continuing "
    "mid-epoch would repeat some samples and skip others")
"""Why a stage folder of format 4 is not continued (older_format)."""

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



class CheckpointRecord(Record):
    """checkpoints/step<N>/complete: written by rank 0 once every rank saved its part. The tag
    counts only while every file it lists is there, whole and unchanged."""

    format: Literal[5] = MANIFEST_FORMAT
    """The harness version that wrote it (a tag of another format is not resumed: older_format)."""
    progress: Progress
    engine: EngineIdentity
    files: dict[str, FileCheck]
    """Every file of the tag, relative to the tag's folder."""


class ResumePoint(Record):
    """How a stage with checkpoints of its own continues (decided on the launch side, harness/stages/resume.py)."""

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



class StartDecision(Record):
    """How a stage takes over from the previous one, decided on the launch side (harness/stages/start.py)."""

    mode: Literal["init", "full_state", "weights_only"]
    """init: the plan's model; full_state: the previous DeepSpeed checkpoint, optimizer moments
    included; weights_only: the previous Hugging Face model, fresh optimizer."""
    reason: str
    previous: EngineIdentity | None = None
    """The previous stage as the decision saw it: the worker checks that its manifest says the same."""



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
