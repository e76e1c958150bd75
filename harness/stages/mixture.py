"""Weighted mixtures (data.sources), the rules both sides need: how many of each cycle of MIX_CYCLE
samples each source gets, which source each position of the mixture's stream draws from and its
position in that source's own stream, and how many samples of each a stretch of the stream takes.
Pure (numpy only): `harness plan` shows what they imply, stage.json carries the quotas, the ranks
carry them out (harness/worker/mixture.py).

The interleave: in each cycle source k gets quota_k samples (weights apportioned by largest
remainder), spread evenly: its j-th sample of the cycle sits at time (j + 1/2) / quota_k, and the
cycle's positions are those times in order (ties: the lower source first). Every prefix of the
stream then holds each source's share to within about one sample, with no randomness and no state:
position p is cycle p // MIX_CYCLE, slot p % MIX_CYCLE. Within each source the samples come in its
own seeded epoch order, so the regular interleave does not make the data regular.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np

from harness.plan import MIX_CYCLE, DataSpec, Strict


class MixPlan(Strict):
    """How a stage draws from a mixture's sources (stage.json; harness/worker/mixture.py carries it out)."""

    quotas: list[int]
    """Samples of each source in every cycle of `cycle` samples."""
    cycle: int = MIX_CYCLE
    exhausted: Literal["repeat", "stop"]
    """What happens when a source has drawn all its training samples (data.exhausted, unset: repeat)."""


def mix_plan(spec: DataSpec) -> MixPlan | None:
    """The mix of a data set with sources (None without)."""
    if not spec.sources:
        return None
    shares = [share for _, share in spec.weighted_sets()]
    floors = [math.floor(share * MIX_CYCLE) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: (floors[k] - shares[k] * MIX_CYCLE, k))
    for k in by_remainder[: MIX_CYCLE - sum(floors)]:
        floors[k] += 1
    return MixPlan(quotas=floors, exhausted=spec.exhausted or "repeat")


class Mixture:
    """A mix's interleave: position -> (source, position in that source's stream)."""

    def __init__(self, plan: MixPlan):
        self.plan = plan
        times = np.concatenate([(np.arange(q) + 0.5) / q for q in plan.quotas])
        sources = np.repeat(np.arange(len(plan.quotas)), plan.quotas)
        slots = np.lexsort((sources, times))
        self.source_of_slot = sources[slots]
        self.rank_in_cycle = np.concatenate([np.arange(q) for q in plan.quotas])[slots]
        self.quotas = np.array(plan.quotas, dtype=np.int64)

    def split(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position within the source's own stream) of each position of the mixture's stream."""
        cycles, slots = np.divmod(np.asarray(positions, dtype=np.int64), self.plan.cycle)
        sources = self.source_of_slot[slots]
        return sources, cycles * self.quotas[sources] + self.rank_in_cycle[slots]

    def drawn(self, end: int) -> np.ndarray:
        """Samples of each source among the stream's positions 0 .. end-1."""
        cycles, slots = divmod(end, self.plan.cycle)
        return cycles * self.quotas + np.bincount(self.source_of_slot[:slots], minlength=len(self.quotas))
