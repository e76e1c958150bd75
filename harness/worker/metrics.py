"""Where rank 0's numbers go: the stage's metrics.jsonl (always) and a monitor (W&B or none).

Other ranks get a NullMetrics, so the loop logs without asking who it is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class NullMetrics:
    """Stand-in on ranks other than 0: accepts everything, writes nothing."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog(NullMetrics):
    """Appends one JSON line per logged step to metrics.jsonl and forwards rows to a monitor."""

    def __init__(self, path: Path, resumed_step: int, monitor: NullMetrics):
        self.path = path
        self.monitor = monitor
        self._drop_after(resumed_step)
        self._file = open(path, "a")

    def _drop_after(self, step: int) -> None:
        """Forget lines past the checkpoint we resume from, so no step is logged twice. A stage that
        starts again from its beginning (step 0) logs its eval before step 1 again: nothing is kept."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if (logged := _stage_step(line)) is not None and 0 < step and logged <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.monitor.log(row)

    def close(self) -> None:
        self._file.close()
        self.monitor.close()


def _stage_step(line: str) -> int | None:
    try:
        return json.loads(line)["stage_step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line cut by a crash
