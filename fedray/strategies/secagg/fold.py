"""A combiner's part of SecAgg+: add masked vectors in Z_{2^32}, in O(P) memory.

A combiner sees only masked vectors, each hidden by its client's self-mask, so its
running sum is as uniform as any one of them; it learns who sent, and their public
weights, nothing more. Checks here are of shape only (the values are ring elements:
every uint32 is valid), and an input is folded once.
"""

from __future__ import annotations

import numpy as np

from fedray.errors import SecAggError
from fedray.strategies.secagg.messages import MaskedInput, MaskedPartial, RoundSetup


class MaskedFold:
    """One combiner's share of a round: the ring sum of its clients' masked inputs."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self.total = np.zeros(setup.length, np.uint32)
        self.senders: set[int] = set()
        self.weight = 0

    def fold(self, masked: MaskedInput) -> None:
        vector = masked.vector
        if masked.sender not in self.setup.clients:
            raise SecAggError("refused", f"client {masked.sender} is not in this round")
        if masked.sender in self.senders:
            raise SecAggError("refused", f"client {masked.sender}'s input is already folded: "
                              "a second one is dropped")
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 \
                or vector.shape != (self.setup.length,):
            raise SecAggError("refused", f"client {masked.sender}'s input is not "
                              f"{self.setup.length} uint32 values")
        if not 1 <= masked.weight <= self.setup.max_weight:
            raise SecAggError("refused", f"client {masked.sender}'s weight {masked.weight} "
                              f"is outside 1..{self.setup.max_weight}")
        np.add(self.total, vector, out=self.total)  # wraps: the ring's own addition
        self.senders.add(masked.sender)
        self.weight += masked.weight

    def partial(self) -> MaskedPartial:
        return MaskedPartial(frozenset(self.senders), self.weight, self.total)
