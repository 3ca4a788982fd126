"""What a session runner reports, as typed events, and the callbacks that consume them.

The runner only carries out the strategy's decisions and says what happened; tracking,
metrics and the progress `fedray run` shows are callbacks on these events. A failing
callback is logged and never stops a round. ``flush`` is the one thing the runner waits
on: after a commit, until tracking holds it (a restarted controller resumes from there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from fedray.actors.memory import release_free_memory
from fedray.messages import RoundResult, ValidationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionCreated:
    session_id: str
    federation: str
    config: dict[str, Any]
    rounds_planned: int
    seed_model_id: str
    package_sha256: str = ""
    package_size: int = 0
    continued_from: str = ""
    strategy: str = ""
    asynchronous: bool = False
    seed_mac: str = ""  # the controller's signature of the seed (fedray.tracking.resume)
    submitted_by: str = ""  # who asked for it (fedray session start, the API)


@dataclass(frozen=True)
class SessionMoved:
    """A session state change (waiting, running, finished, failed), with fields to record."""

    session_id: str
    state: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecorded:
    model_id: str
    parent_id: str | None
    session_id: str
    round: int
    size: int
    uri: str
    tensors: dict[str, Any]


@dataclass(frozen=True)
class RoundStarted:
    session_id: str
    round: int
    attempt: int
    model_id: str
    asked: dict[str, int]
    clients: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundFailed:
    session_id: str
    round: int
    attempt: int
    reason: str
    combiners: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # client id -> its error


@dataclass(frozen=True)
class RoundCommitted:
    session_id: str
    round: int
    attempt: int
    model_id: str
    parent_id: str
    updates: int
    rejected: int
    seconds: float
    reduce_s: float
    state_id: str
    train_metrics: dict[str, float]
    combiners: dict[str, Any] = field(default_factory=dict)
    lost_combiners: list[str] = field(default_factory=list)
    report: dict[str, float | None] = field(default_factory=dict)  # epsilon...; None: infinite
    contributions: list[dict[str, Any]] = field(default_factory=list)  # async: who built it
    mode: str = "sync"
    commit_mac: str = ""  # the controller's signature of what it committed
    codec: str = "none"  # session.codec: how the round's updates were sent
    stages: dict[str, Any] = field(default_factory=dict)  # the non-train stages' traffic


@dataclass(frozen=True)
class RoundValidated:
    session_id: str
    round: int
    model_id: str
    metrics: dict[str, float]
    reports: list[tuple[str, ValidationReport]] = field(default_factory=list)  # (combiner, r)


@dataclass(frozen=True)
class RoundDone:
    """The round's line for the progress display: committed and, if asked, validated."""

    session_id: str
    record: dict[str, Any]


@dataclass(frozen=True)
class ClientsOnline:
    """How many clients are online while the runner waits for them (progress only)."""

    session_id: str
    count: int


@dataclass(frozen=True)
class Notice:
    """Anything else worth a line in the events log."""

    level: str
    message: str
    session_id: str = ""
    round: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


RunnerEvent = (SessionCreated | SessionMoved | ModelRecorded | RoundStarted | RoundFailed
               | RoundCommitted | RoundValidated | RoundDone | ClientsOnline | Notice)


class Callback(Protocol):
    def on_event(self, event: RunnerEvent) -> None: ...


class Callbacks:
    """Fans events out; one callback failing does not keep the others from hearing."""

    def __init__(self, callbacks: Sequence[Any], flush: Callable[[], Any] | None = None) -> None:
        self.callbacks = list(callbacks)
        self._flush = flush  # async () -> None: wait until tracking holds every write

    def emit(self, event: RunnerEvent) -> None:
        for callback in self.callbacks:
            try:
                callback.on_event(event)
            except Exception:  # noqa: BLE001 - observability never stops a round
                log.exception("callback %s failed on %s", type(callback).__name__,
                              type(event).__name__)

    async def flush(self) -> None:
        if self._flush is not None:
            await self._flush()


def combiner_doc(result: RoundResult) -> dict[str, Any]:
    """One combiner's share of a round, as the round document records it."""
    return {"asked": result.asked, "updates": result.updates, "rejected": result.rejected,
            "rejections": result.rejections, "failed": result.failed,
            "failures": result.failures, "close_reason": result.close_reason,
            "seconds": round(result.seconds, 4), "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out, "aggregation_s": round(result.aggregation_s, 4)}


class TrackingCallback:
    """Events as tracking writes (through the observer's queued writer) and metrics."""

    def __init__(self, observer: Any) -> None:
        self.observer = observer

    def _event(self, level: str, message: str, session_id: str, round_: int | None = None,
               **data: Any) -> None:
        self.observer.event(level, message, session_id=session_id, round=round_, **data)

    def on_event(self, e: RunnerEvent) -> None:
        write = self.observer.write
        if isinstance(e, SessionCreated):
            write("create_session", e.session_id, e.federation, e.config, e.rounds_planned,
                  e.seed_model_id)
            write("update_session", e.session_id, seed_model_id=e.seed_model_id,
                  package_sha256=e.package_sha256, package_size=e.package_size,
                  continued_from=e.continued_from or None,
                  strategy=e.strategy, mode="async" if e.asynchronous else "sync",
                  **({"seed_mac": e.seed_mac} if e.seed_mac else {}),
                  **({"submitted_by": e.submitted_by} if e.submitted_by else {}))
            self._event("info", f"session {e.session_id} created"
                        + (f", continuing {e.continued_from}" if e.continued_from else ""),
                        e.session_id)
        elif isinstance(e, SessionMoved):
            write("update_session", e.session_id, status=e.state, **e.fields)
        elif isinstance(e, ModelRecorded):
            write("add_model", e.model_id, e.parent_id, e.session_id, e.round, e.size, e.uri,
                  e.tensors)
        elif isinstance(e, RoundStarted):
            write("start_round", e.session_id, e.round, parent_model_id=e.model_id,
                  attempt=e.attempt, clients_asked=e.asked)
            self._event("info", f"round {e.round} started: {sum(e.asked.values())} client(s) "
                        f"asked to train model {e.model_id[:12]}", e.session_id, e.round,
                        attempt=e.attempt, clients_asked=e.asked)
        elif isinstance(e, RoundFailed):
            write("update_round", e.session_id, e.round, status="failed", reason=e.reason,
                  combiners=e.combiners, attempt=e.attempt, failures=e.failures)
            self._event("error", f"round {e.round} failed: {e.reason}", e.session_id, e.round)
        elif isinstance(e, RoundCommitted):
            write("update_round", e.session_id, e.round, status="finished", model_id=e.model_id,
                  parent_model_id=e.parent_id, updates=e.updates, rejected=e.rejected,
                  combiners=e.combiners, lost_combiners=e.lost_combiners, reduce_s=e.reduce_s,
                  seconds=e.seconds, attempt=e.attempt, aggregator_state_id=e.state_id,
                  train_metrics=e.train_metrics, validation_metrics={}, report=e.report,
                  contributions=e.contributions, mode=e.mode, codec=e.codec,
                  bytes_in=sum(c.get("bytes_in", 0) for c in e.combiners.values()),
                  bytes_out=sum(c.get("bytes_out", 0) for c in e.combiners.values()),
                  **({"commit_mac": e.commit_mac} if e.commit_mac else {}),
                  **({"stages": e.stages} if e.stages else {}))
            write("update_session", e.session_id, rounds_done=e.round, model_id=e.model_id)
            self.observer.round_committed(e.seconds)
            what = "version" if e.mode == "async" else "round"
            figures = "".join(f", {k} {'none' if v is None else format(v, '.4g')}"
                              for k, v in e.report.items())
            self._event("info", f"{what} {e.round} committed model {e.model_id[:12]} from "
                        f"{e.updates} update(s) in {e.seconds:.2f}s{figures}", e.session_id,
                        e.round)
        elif isinstance(e, RoundValidated):
            for combiner, report in e.reports:
                write("add_validation", {
                    "session_id": e.session_id, "round": e.round, "model_id": report.model_id,
                    "client_id": report.client_id, "combiner": combiner,
                    "num_examples": report.num_examples, "metrics": report.metrics})
            write("update_round", e.session_id, e.round, validation_metrics=e.metrics)
        elif isinstance(e, Notice):
            self._event(e.level, e.message, e.session_id, e.round, **e.data)

    async def flush(self) -> None:
        """Until every write so far has landed (retried while tracking is down)."""
        while not await asyncio.to_thread(self.observer.flush, 10.0):
            log.warning("tracking is not answering; the session waits for its writes")


HISTORY_KEPT = 256  # round records the controller keeps for watchers (tracking has them all)


@dataclass
class SessionStatus:
    """What `fedray run` shows while a session runs; sent as a plain dict.

    ``history`` holds the last ``HISTORY_KEPT`` round records (a record is never changed
    once added); ``history_total`` counts every record added, so a watcher that already
    has the first ``n`` asks only for the ones after them (``snapshot(after=n)``).
    """

    session_id: str
    state: str = "created"
    rounds_planned: int = 0
    rounds_done: int = 0
    round: int = 0
    round_state: str = ""
    clients_online: int = 0
    model_id: str = ""
    reason: str = ""
    stopped_by: str = ""
    strategy: str = ""
    mode: str = "sync"
    history: list[dict[str, Any]] = field(default_factory=list)
    history_total: int = 0

    def add_record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.history_total += 1
        del self.history[:-HISTORY_KEPT]

    def snapshot(self, after: int | None = None) -> dict[str, Any]:
        """The status as a dict, with the records after the first ``after`` (all that are
        kept when ``after`` is None or more than this status ever had). O(new records),
        however long the session has run."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}
        first = self.history_total - len(self.history)  # number of the oldest kept record
        skip = 0 if after is None or after > self.history_total else max(0, after - first)
        out["history"] = [dict(record) for record in self.history[skip:]]
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StatusCallback:
    """Keeps a ``SessionStatus`` up to date and calls ``on_change`` after every change."""

    def __init__(self, status: SessionStatus, on_change: Callable[[SessionStatus], Any]) -> None:
        self.status = status
        self.on_change = on_change

    def update(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.status, name, value)
        self.on_change(self.status)

    def on_event(self, e: RunnerEvent) -> None:
        if isinstance(e, SessionMoved):
            self.update(state=e.state, **{k: v for k, v in e.fields.items()
                                          if k in ("rounds_done", "model_id", "reason",
                                                   "stopped_by")})
        elif isinstance(e, RoundStarted):
            self.update(round=e.round, round_state="running")
        elif isinstance(e, RoundCommitted):
            self.update(rounds_done=e.round, model_id=e.model_id, round_state="finished")
        elif isinstance(e, RoundDone):
            self.status.add_record(e.record)
            self.update()
        elif isinstance(e, ClientsOnline):
            self.update(clients_online=e.count)


class ReleaseAfterRounds:
    """Free memory goes back to the system once each round is done (``fedray.actors.memory``)."""

    def on_event(self, event: RunnerEvent) -> None:
        if isinstance(event, RoundDone):
            release_free_memory()
