"""A stage's memory as the launch side planned it: the per-rank estimate (harness/stages/memory.py),
the memory a rank has, and each choice the estimate made (harness/stages/fit.py). Carried by
stage.json (the Stage), the manifest and every rank's memory record, so a run's measured peaks
can be read against it."""
from __future__ import annotations

from typing import Literal

from harness.records.files import Record


class RankMemory(Record):
    """The memory one rank of a stage has: found on the launch side (harness/launch/hosts.py), or
    the plan's cluster.rank_memory_gb."""

    device: Literal["gpu", "host"]
    """Where training state lives: GPU memory on cuda, host memory on cpu."""
    device_bytes: int
    host_bytes: int | None
    """Host memory per rank (cuda: where offloaded states go); on cpu the same as device_bytes."""
    source: str
    """Where the figure comes from, e.g. 'MemTotal 24.0 GB / 2 ranks per node'."""


class MemoryEstimate(Record):
    """The estimated peak of one rank of a stage, in bytes, in three parts (harness/stages/memory.py):
    what the rank holds through the whole step (`held`), and the larger of what the end of the
    forward adds (`forward`: saved activations, logits) and what the end of the backward adds
    (`backward`: gradients not yet reduced, communication buffers): the backward frees the
    activations as it makes the gradients. All on the rank's device (GPU memory on cuda, host
    memory on cpu), except `host`: what offload keeps in host memory on cuda (on cpu offloaded
    states stay in `held`: they are host memory already)."""

    device: Literal["gpu", "host"]
    held: dict[str, int]
    forward: dict[str, int]
    backward: dict[str, int]
    host: dict[str, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self.held.values()) + max(sum(self.forward.values()), sum(self.backward.values()))

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    def breakdown(self) -> str:
        """'runtime 0.50 + weights 1.24 + ... + max(forward: activations 0.20 + logits 0.05, backward:
        gradients 1.24) = 5.10 GB' (and the host side, when offloaded)."""
        def terms(part: dict[str, int]) -> str:
            return " + ".join(f"{name} {gb(value)}" for name, value in part.items() if value) or "0"

        text = f"{terms(self.held)} + max(forward: {terms(self.forward)}, backward: {terms(self.backward)}) = {gb(self.total_bytes)} GB"
        if self.host:
            text += f"; in host memory: {terms(self.host)} = {gb(self.host_bytes)} GB"
        return text


class MemoryDecision(Record):
    """One setting the estimate chose (a plan value `auto`), and why."""

    field: str
    """The plan field: zero_stage, offload, activation_checkpointing or micro_batch."""
    value: str
    reason: str


class MemoryPlan(Record):
    """What a stage's memory was planned as: the estimate of the configuration it runs, the memory
    a rank has (None: unknown, nothing was checked), and the choices made for its `auto` settings."""

    estimate: MemoryEstimate
    rank_memory: RankMemory | None = None
    decisions: list[MemoryDecision] = []


def gb(n: int) -> str:
    """Bytes as GB (1e9) with two decimals."""
    return f"{n / 1e9:.2f}"
