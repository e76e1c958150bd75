"""What crosses a process boundary: every file the launch side and the ranks hand each other, as
typed records, and where each lives in a run folder. Below the stages, above the plan; no torch.

    layout.py        every run-folder name: RunDir, StageDir
    files.py         atomic writes, the Record base, file checksums, JSON lines
    engine.py        EngineIdentity and `differences`: what resume and handoff compare
    checkpoints.py   Progress, checkpoint markers, start and resume decisions, started.json
    manifest.py      manifest.json and the records it embeds; `is_done`
    launches.py      rank and memory records, SLURM jobs
    memory.py        the memory a stage was planned with: estimate, a rank's memory, auto decisions
    token_store.py   the token-store format
    console.py       the console line protocol
    exit_codes.py    exit codes the ranks and the launch side agree on
"""
from harness.records.checkpoints import (MANIFEST_FORMAT, CheckpointRecord, LoadRecord, Progress, ResumePoint, ResumeRecord, StartDecision,
                                         StartRecord)
from harness.records.engine import Adapter, EngineIdentity, adapter_text, differences, zero_family
from harness.records.files import FileCheck, InvalidRecord, Record, damaged_files, file_check, folder_checks, read_json_lines, write_atomic
from harness.records.launches import MemoryRecord, RankRecord, SlurmJob, SlurmJobs
from harness.records.layout import CHECKPOINT_COMPLETE, RunDir, StageDir
from harness.records.manifest import (BatchRecord, FastRecord, GroupRecord, Manifest, ProbeTry, ReferenceRecord, TrainableRecord, is_done,
                                      older_format, read_manifest)

__all__ = [
    "CHECKPOINT_COMPLETE", "MANIFEST_FORMAT", "Adapter", "BatchRecord", "CheckpointRecord", "EngineIdentity", "FastRecord", "FileCheck", "GroupRecord",
    "InvalidRecord", "LoadRecord", "Manifest", "MemoryRecord", "ProbeTry", "Progress", "RankRecord", "Record", "ReferenceRecord", "ResumePoint",
    "ResumeRecord", "RunDir", "SlurmJob", "SlurmJobs", "StageDir", "StartDecision", "StartRecord", "TrainableRecord", "damaged_files",
    "adapter_text", "differences", "file_check", "folder_checks", "is_done", "older_format", "read_json_lines", "read_manifest", "write_atomic",
    "zero_family",
]
