"""A combiner's open share of a stage (or of an asynchronous session), and what it serves.

One ``Share`` is open at a time: the tasks it sent out, who has answered, the running
aggregate (train), the reports or replies it collected (other stages), and the counts
its ``RoundResult`` reports. ``admit`` is the one place that decides whether a report
from the network answers a task of the open share; ``task_for`` builds the tasks it sends.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedray.errors import UpdateRejected
from fedray.messages import MetricSums, Task, TaskKind
from fedray.serialization import Layout
from fedray.strategies.base import Strategy
from fedray.strategies.declaration import Stage, UpdateLayout
from fedray.strategies.updates import Accumulator


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A model a share serves and checks updates against (the bytes live in the shelf)."""

    version: int
    model_id: str
    layout: Layout
    base: Mapping[str, np.ndarray]  # read-only views into the model bytes
    size: int
    norm: NormBound | None = None  # how far an update may move it (None: no bound)


@dataclass(frozen=True, slots=True)
class NormBound:
    """The L2 norm an update's difference from its base may not exceed, and the setting
    that set it (for the refusal's message)."""

    limit: float
    rule: str
    base_norm: float = math.inf  # ||w|| of the version's base, for the cheap first check


@dataclass(frozen=True, slots=True)
class Limits:
    max_examples: int


@dataclass(frozen=True, slots=True)
class TaskEntry:
    client_id: str
    version: int  # the model version the task sent out


@dataclass(frozen=True, slots=True)
class Expected:
    """What an update must look like, from the strategy's declared ``UpdateLayout`` over
    the global model's spec: its tensors, and at most how many bytes it can take."""

    layout: UpdateLayout
    spec: dict[str, tuple[str, tuple[int, ...]]]
    header_bound: int  # of its safetensors header (what the global model's needs, doubled)
    size_bound: int  # of the whole payload


@dataclass(eq=False)
class Share:
    """One combiner's open share of a stage, or of an asynchronous session's stream.

    In a synchronous round ``versions`` holds the round's one model (none for a stage
    that sends no model); asynchronously it holds the recent versions clients may still
    be training from.
    """

    session_id: str
    round: int
    kind: TaskKind
    strategy: Strategy
    accumulator: Accumulator | None
    limits: Limits
    versions: dict[int, ModelVersion]
    current: int
    deadline: float  # monotonic
    stage: Stage
    expected: Expected | None = None  # train shares: what updates are checked against
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    asynchronous: bool = False
    buffer: int = 0
    started: float = field(default_factory=time.monotonic)
    settled: set[str] = field(default_factory=set)  # client ids
    gone: set[str] = field(default_factory=set)  # settled because they went offline
    uploading: set[str] = field(default_factory=set)  # one upload per client at a time
    accepted: int = 0
    round_accepted: int = 0  # across every combiner (buffered rounds: from the controller)
    attempt: int = 1
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # client id -> why its task failed
    bytes_in: int = 0  # update bytes, and a STAGE share's reply bytes
    bytes_sent: int = 0  # task payloads sent (the strategy's messages to its clients)
    aggregation_s: float = 0.0
    metrics: MetricSums = field(default_factory=MetricSums)
    validations: list[Any] = field(default_factory=list)
    replies: dict[str, bytes] = field(default_factory=dict)  # a STAGE share's answers
    folded: list[str] = field(default_factory=list)  # a train share: whose updates it folded
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on every accepted fold
    close_reason: str = ""
    fold_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def admit(self, client_id: str, task_id: str, session_id: str, round_: int,
              kind: TaskKind, model_id: str | None = None, stage: str = "") -> TaskEntry:
        """The task a report answers, or UpdateRejected saying why it answers none."""
        if self.session_id != session_id or self.kind is not kind \
                or (not self.asynchronous and self.round != round_) \
                or (stage and stage != self.stage.name):
            what = stage or kind.value
            raise UpdateRejected("stale", f"no open {what} round {round_} of session "
                                 f"{session_id[:16]}")
        entry = self.tasks.get(task_id)
        if entry is None or entry.client_id != client_id:
            raise UpdateRejected("unknown_task", f"task {task_id[:32]} was not given to "
                                 f"{client_id}")
        if not self.asynchronous and client_id in self.settled and client_id not in self.gone:
            raise UpdateRejected("duplicate", f"{client_id} already answered task {task_id}")
        if self.asynchronous and entry.version != round_:
            raise UpdateRejected("unknown_task", f"task {task_id[:32]} was for version "
                                 f"{entry.version}, not {round_}")
        if model_id is not None:
            version = self.versions.get(entry.version)
            if version is None or model_id != version.model_id:
                raise UpdateRejected("wrong_model", f"trained from {model_id[:12]}, the task "
                                     f"sent {version.model_id[:12] if version else 'a model now gone'}")
        if self.closed.is_set():
            raise UpdateRejected("round_closed", f"round {self.round} closed "
                                 f"({self.close_reason})")
        return entry

    def delivered(self, client_id: str) -> None:
        """A client marked offline mid-task delivered after all: it counts once."""
        if client_id in self.gone:
            self.gone.discard(client_id)
            self.failed -= 1


def task_for(task_id: str, share: Share, version: ModelVersion | None, config: Mapping[str, Any],
             deadline_unix: float, package: tuple[str, int], payload: bytes = b"",
             client_half: str = "", codec: tuple[str, dict[str, Any]] = ("", {}),
             delta: tuple[str, int] = ("", 0)) -> Task:
    """The task a share sends one client (``version`` None: a stage without a model);
    ``codec`` (name, options) is how a train task's update is sent and ``delta`` (from,
    size) the codec delta its model can be fetched as."""
    return Task(task_id=task_id, kind=share.kind, session_id=share.session_id,
                round=share.current if share.asynchronous else share.round,
                model_id=version.model_id if version else "",
                model_size=version.size if version else 0, config=dict(config),
                deadline_unix=deadline_unix, package_sha256=package[0],
                package_size=package[1], stage=share.stage.name, payload=payload,
                client_half=client_half,
                codec=codec[0] if share.kind is TaskKind.TRAIN or delta[0] else "",
                codec_options=dict(codec[1]) if share.kind is TaskKind.TRAIN or delta[0] else {},
                delta_from=delta[0], delta_size=delta[1])


class ShareSlot:
    """The one share a combiner has open: a stage of a round, or an asynchronous stream.
    Opening a share closes the one before it (``superseded``)."""

    def __init__(self) -> None:
        self.share: Share | None = None

    def open(self, share: Share) -> None:
        previous, self.share = self.share, share
        if previous is not None and not previous.closed.is_set():
            self.close(previous, "superseded")

    @staticmethod
    def close(share: Share, reason: str) -> None:
        share.close_reason = reason
        share.closed.set()

    def lookup(self, session_id: str) -> Share:
        """The open share, whatever it is (``Share.admit`` checks that a report fits it)."""
        if self.share is None:
            raise UpdateRejected("stale", f"no round of session {session_id[:16]} is open")
        return self.share
