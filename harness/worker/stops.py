"""Two ways a stage stops before its end, each with an exit code the launch side explains
(harness/launch/failures.py):

- NonFiniteLoss: the training loss was NaN or infinite for nonfinite_steps steps in a row, or at
  the stage's last step (its state would be handed on). While the last step's loss is not finite
  no checkpoint is saved (LossWatch.finite), so a rerun resumes from a state that trained.
- DiskFull: a checkpoint or the handoff could not be written for lack of space (ENOSPC) or quota
  (EDQUOT). What was half-written is never marked complete: no completion marker, no manifest.
"""
from __future__ import annotations

import errno
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.records import NonFiniteRecord, StageDir


class NonFiniteLoss(Exception):
    def __init__(self, record: NonFiniteRecord):
        super().__init__(f"loss not finite at steps {record.steps}")
        self.record = record

    def report(self, stage_dir: StageDir, is_rank0: bool) -> None:
        """Rank 0 writes ranks/nonfinite.json, for the launch side's message."""
        if is_rank0:
            self.record.write(stage_dir.nonfinite)


class LossWatch:
    """Follows the training loss step by step (the same all-reduced value on every rank, so every
    rank stops at the same step)."""

    def __init__(self, limit: int, last_step: int):
        self.limit, self.last_step = limit, last_step
        self.run: list[tuple[int, float]] = []
        """The steps in a row, up to now, whose loss was not finite."""
        self.last_finite: tuple[int, float] | None = None

    @property
    def finite(self) -> bool:
        """The last step's loss was finite: its state may be saved."""
        return not self.run

    def update(self, step: int, loss: float) -> None:
        """Raises NonFiniteLoss at the limit, or when the stage's last step is not finite."""
        if math.isfinite(loss):
            self.run, self.last_finite = [], (step, loss)
            return
        self.run.append((step, loss))
        if len(self.run) >= self.limit or step == self.last_step:
            raise NonFiniteLoss(NonFiniteRecord(steps=[s for s, _ in self.run], losses=[str(v) for _, v in self.run],
                                                last_finite_step=self.last_finite[0] if self.last_finite else None,
                                                last_finite_loss=self.last_finite[1] if self.last_finite else None, limit=self.limit))


class DiskFull(Exception):
    def __init__(self, folder: Path, what: str, error: BaseException):
        super().__init__(f"no space to write {what} into {folder} ({error})")
        self.folder, self.what = folder, what

    def report(self) -> None:
        """One line on the rank's output (a full disk may keep it from any file)."""
        free = shutil.disk_usage(self.folder if self.folder.exists() else self.folder.parent).free
        try:
            print(f"[harness] disk full: {self.what} could not be written into {self.folder} ({free / 1e6:.1f} MB free)", flush=True)
        except OSError:
            pass


# torch.save (DeepSpeed's checkpoint writer) reports ENOSPC as a RuntimeError without its errno
# (torch 2.13: "PytorchStreamWriter failed writing file ...: file write failed", or a C++ stream's
# "basic_ios::clear: iostream error"), so a disk left with less than this free counts as full too.
SPACE_WORDS = ("No space left on device", "Disk quota exceeded")
NEARLY_FULL_BYTES = 1 << 20


@contextmanager
def written(folder: Path, what: str) -> Iterator[None]:
    """Raises DiskFull when the writes inside fail for lack of space or quota."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if _out_of_space(error, folder):
            raise DiskFull(folder, what, error) from error
        raise


def _out_of_space(error: BaseException | None, folder: Path) -> bool:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if shutil.disk_usage(existing).free < NEARLY_FULL_BYTES:
        return True
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(error) for words in SPACE_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False
