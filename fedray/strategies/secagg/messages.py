"""What the four stages of a SecAgg+ round send, as typed, frozen values.

    stage            client -> server          server -> client
    advertise keys   Advertise                 Roster (the neighbours' public keys)
    share keys       ShareKeys (envelopes)     Inbox (the envelopes sent to it)
    masked input     MaskedInput               (combiners fold: MaskedPartial)
    unmask           UnmaskReply               UnmaskRequest (who survived, who dropped)

Clients are named by their index in the round (1..n), which is also the point of the
Shamir shares they hold. ``RoundSetup`` is what every party agrees on before the round:
the controller draws it and sends it with the first stage.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedray.errors import SecAggError
from fedray.strategies.secagg import graph
from fedray.strategies.secagg.quantize import Quantizer


@dataclass(frozen=True)
class RoundSetup:
    """A round's public parameters: every party derives the same graph from them."""

    round_id: bytes  # binds seeds and envelopes to this session's round
    graph_seed: bytes  # drawn by the controller; fixes who neighbours whom
    clients: tuple[int, ...]  # the indices asked, 1..65535
    degree: int
    threshold: int
    quantizer: Quantizer
    length: int  # values in a masked vector (P); 0: the model's, sized by each party (sized)
    max_weight: int = 1

    def __post_init__(self) -> None:
        clients = tuple(sorted(set(self.clients)))
        if len(clients) != len(self.clients) or not clients or clients[0] < 1 \
                or clients[-1] > 0xFFFF:
            raise ValueError("clients are distinct indices in 1..65535")
        object.__setattr__(self, "clients", clients)
        degree = min(self.degree, len(clients) - 1)
        if not degree // 2 < self.threshold <= degree:
            raise ValueError(f"threshold {self.threshold} must be over half the degree "
                             f"{degree} and at most it, so that no one can be unmasked "
                             "twice over")
        if self.length < 0 or self.max_weight < 1:
            raise ValueError("length is a whole number >= 0, max_weight one >= 1")
        self.quantizer.check_headroom(len(clients) * self.max_weight)

    def sized(self, length: int) -> RoundSetup:
        """This setup for masked vectors of ``length`` values: a setup drawn before the
        model was at hand (length 0) takes it; one of another length refuses it."""
        if self.length == length:
            return self
        if self.length or length < 1:
            raise SecAggError("refused", f"a masked vector of {length} values in a round "
                              f"of {self.length}: the model changed under the round")
        return dataclasses.replace(self, length=length)

    @functools.cached_property
    def neighbours(self) -> Mapping[int, frozenset[int]]:
        return graph.neighbours(self.graph_seed, self.clients, self.degree)


@dataclass(frozen=True, slots=True)
class Advertise:
    sender: int
    c_public: bytes  # keys the envelopes' channel
    s_public: bytes  # keys the pairwise masks


@dataclass(frozen=True, slots=True)
class Roster:
    """The keys of the clients that advertised (a client reads its neighbours')."""

    keys: Mapping[int, tuple[bytes, bytes]]  # index -> (c_public, s_public)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A share pair sealed from ``sender`` to ``receiver``: relays cannot read it."""

    sender: int
    receiver: int
    sealed: bytes


@dataclass(frozen=True, slots=True)
class ShareKeys:
    sender: int
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class Inbox:
    receiver: int
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class MaskedInput:
    sender: int
    weight: int
    vector: np.ndarray  # uint32, RoundSetup.length values


@dataclass(frozen=True)
class MaskedPartial:
    """A combiner's fold: the ring sum of its clients' masked vectors, and whose."""

    senders: frozenset[int]
    weight: int
    total: np.ndarray = field(compare=False)


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    survivors: frozenset[int]  # sent a masked input: reveal self-mask seed shares
    dropped: frozenset[int]  # shared keys, sent no input: reveal mask key shares

    def __post_init__(self) -> None:
        if self.survivors & self.dropped:
            raise SecAggError("refused", f"clients {sorted(self.survivors & self.dropped)} "
                              "are named both survivors and dropped: no share is revealed")


@dataclass(frozen=True, slots=True)
class UnmaskReply:
    sender: int
    self_shares: Mapping[int, bytes]  # survivor index -> share of its self-mask seed
    key_shares: Mapping[int, bytes]  # dropped index -> share of its mask private key
