"""The order a data set's samples are trained in, computed per position: nothing is stored.

A keyed permutation of range(n) (a Feistel network) turns a position into a sample index in a few
vectorised integer operations, so a rank's memory for the order is a few numbers whatever n is
(before: two stored permutations, 8 bytes per sample each, about 3.9 GB per rank at 244M
samples). Split: the permutation keyed by (seed, 'split') lays out every sample; the last
n_eval of that layout are held out, the others train. Epoch e visits the training samples in the
order of the permutation keyed by (seed, 'epoch', e). Position p is sample split(epoch_{p // n_train}(p % n_train)):
every rank computes the same sample for a position, and a resume at position p continues exactly there.
"""
from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudo-random round function give a pseudo-random permutation
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def key_of(*parts: object) -> int:
    """A 64-bit key from its parts (seed, purpose, epoch...), the same on every machine."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of range(n) keyed by a 64-bit key: a balanced Feistel network on the smallest even
    number of bits that holds n, applied again to any value that falls outside range(n) until it
    falls inside (cycle walking: it stays a bijection of range(n); the domain is under 4n, so a
    value takes at most a few walks)."""

    def __init__(self, n: int, key: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.round_keys = [np.uint64(key_of(key, r)) for r in range(ROUNDS)]

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix(right ^ round_key) & self.mask)
        return (left << self.half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        out = self._network(np.asarray(indices, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._network(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class EpochOrder:
    """Which of n samples train and in which order per epoch, from the seed (see the module's text).
    stream: tells apart data sets that share a seed (the sources of a mixture)."""

    def __init__(self, n: int, n_eval: int, seed: int, stream: int = 0):
        self.n, self.n_train, self.seed, self.stream = n, n - n_eval, seed, stream
        self._split = Permutation(n, key_of(seed, stream, "split"))
        self._epoch: tuple[int, Permutation] | None = None

    def held_out(self) -> np.ndarray:
        """The held-out samples: the last n_eval of the split's layout."""
        return self._split(np.arange(self.n_train, self.n))

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The training samples at these stream positions (crossing epochs as needed)."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.n_train)
        out = np.empty(len(offsets), dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._split(self._epoch_order(int(epoch))(offsets[chosen]))
        return out

    def exhausted_by(self, end: int) -> None:
        """A single data set never stops: it starts another epoch (data.exhausted is for mixtures)."""
        return None

    def _epoch_order(self, epoch: int) -> Permutation:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, Permutation(self.n_train, key_of(self.seed, self.stream, "epoch", epoch)))
        return self._epoch[1]
