"""The frozen snapshots a strategy decides over, and the small values it answers with.

The runtime builds a snapshot (who is online, what a combiner's share looks like, what an
update says about itself, what earlier stages of the round returned), calls one of the
strategy's decisions on it, and carries out the value it gets back. Nothing here does
I/O; everything is picklable, because snapshots and plans cross actor boundaries.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedray.config import SessionConfig


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One online client as a combiner sees it: what selection may look at."""

    client_id: str
    combiner: str
    name: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What the controller knows when a round (or an attempt at it) starts."""

    session_id: str
    round: int
    attempt: int
    online: tuple[ClientInfo, ...]
    settings: SessionConfig
    seed: int  # derived from session.seed, the round and the attempt

    def by_combiner(self) -> dict[str, list[ClientInfo]]:
        out: dict[str, list[ClientInfo]] = {}
        for client in self.online:
            out.setdefault(client.combiner, []).append(client)
        return out


MAX_PAYLOAD_BYTES = 1 << 20  # of one client's payload in one task (it travels in the Task)


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """What one stage of a round does: which clients each combiner asks, what they get.

    ``configure`` returns the round's plan (its cohort and the train stage's settings);
    ``plan_stage`` returns one per stage, by default the same clients.
    """

    clients: Mapping[str, tuple[str, ...]]  # combiner -> client ids
    config: Mapping[str, Any] = field(default_factory=dict)  # reaches every asked client
    params: Mapping[str, Any] = field(default_factory=dict)  # reaches every combiner's start
    buffer: int = 0  # close the round on its first K accepted updates, across combiners
    payloads: Mapping[str, bytes] = field(default_factory=dict)  # client id -> its own bytes

    @property
    def asked(self) -> int:
        return sum(len(ids) for ids in self.clients.values())

    def only(self, client_ids: set[str] | frozenset[str]) -> RoundPlan:
        """The same plan, asking only ``client_ids`` (a later stage's survivors)."""
        return replace(self, clients={c: tuple(i for i in ids if i in client_ids)
                                      for c, ids in self.clients.items()},
                       payloads={k: v for k, v in self.payloads.items() if k in client_ids})


@dataclass(frozen=True, slots=True)
class Reply:
    """One client's answer to a stage that is not training: a validation's metrics, or
    the bytes a client half returned for a stage of the strategy's own."""

    client_id: str
    num_examples: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class RoundState:
    """A round attempt as far as it got: the plan ``configure`` made, the replies of
    every stage that ran already (stage name -> client id -> reply), and, once the train
    stage ran, whose updates each combiner folded (combiner -> client ids; None before
    train): exactly the updates the round's partials hold, so a stage after training
    (secure aggregation's unmasking) knows who is in the sum."""

    ctx: RoundContext
    plan: RoundPlan
    replies: Mapping[str, Mapping[str, Reply]] = field(default_factory=dict)
    trained: Mapping[str, tuple[str, ...]] | None = None

    def with_replies(self, stage: str, replies: Mapping[str, Reply]) -> RoundState:
        return replace(self, replies={**self.replies, stage: dict(replies)})

    def with_trained(self, trained: Mapping[str, tuple[str, ...]]) -> RoundState:
        return replace(self, trained={c: tuple(ids) for c, ids in trained.items()})

    @property
    def trained_ids(self) -> frozenset[str] | None:
        """Every client whose update a combiner folded (None before the train stage)."""
        if self.trained is None:
            return None
        return frozenset(i for ids in self.trained.values() for i in ids)


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """What is known about an update once its bytes passed the runtime's checks."""

    client_id: str
    round: int  # the round (or, asynchronously, the model version) its task was for
    num_examples: int
    base_version: int = 0  # the model version it was trained from
    staleness: int = 0  # versions committed since then (0 in synchronous rounds)
    norm: float | None = None  # L2 norm of (update - base model), when it was computed
    metrics: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # asynchronously: the strategy's ``weigh`` decision for it


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""  # a short stable code for a refusal ("stale", "norm", ...)
    detail: str = ""


ACCEPT = Verdict(True)


@dataclass(frozen=True, slots=True)
class Staleness:
    """An asynchronous strategy's decision about one update, from how stale it is: fold
    it with ``weight`` (a factor on its examples), or drop it (``drop`` is the reason)."""

    weight: float = 1.0
    drop: str = ""  # a short stable code ("stale"); empty: fold it
    detail: str = ""

    @classmethod
    def dropped(cls, reason: str, detail: str = "") -> Staleness:
        return cls(0.0, reason, detail)


class CloseReason(enum.StrEnum):
    WAITING = "waiting"
    ALL_ANSWERED = "all_answered"  # every asked client answered or is gone
    DEADLINE = "deadline"
    BUFFER_FULL = "buffer_full"  # the first K updates arrived (session.buffer_size)


@dataclass(frozen=True, slots=True)
class ShareSnapshot:
    """One combiner's share of a stage at one instant."""

    selected: int
    accepted: int
    settled: int  # answered in any way: accepted, rejected, failed, or gone offline
    buffer: int  # the stage closes on its first K accepted replies; 0 = no buffer
    now: float
    deadline: float
    round_accepted: int = 0  # accepted across every combiner, as far as this one knows
    stage: str = "train"  # the stage's name (Stage.name)


def default_closing(s: ShareSnapshot) -> CloseReason:
    if s.buffer and max(s.accepted, s.round_accepted) >= s.buffer:
        return CloseReason.BUFFER_FULL
    if s.settled >= s.selected:
        return CloseReason.ALL_ANSWERED
    if s.now >= s.deadline:
        return CloseReason.DEADLINE
    return CloseReason.WAITING
